"""storage/s3_listing.py: ListObjectsV2 pages read to the same dicts botocore makes, and listings in key ranges
that find what one listing finds. Real botocore parsers, the real S3 server (tests/s3server.py) for real pages."""

import random
import urllib.parse

import aiobotocore.session
import botocore.handlers
import botocore.parsers
import botocore.session
import pytest
import s3fs

from clip_nsfw_spark.storage import s3_listing
from clip_nsfw_spark.storage.filesystem import filesystem, find_sizes_fresh
from clip_nsfw_spark.storage.s3_listing import find_in_ranges, read_contents_first, use_fast_s3_listings
from s3server import ACCESS_KEY, SECRET_KEY, LatencyProxy

LIST_V2 = botocore.session.get_session().get_service_model("s3").operation_model("ListObjectsV2")
NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def parse_both(body: bytes, status: int = 200) -> tuple[dict, dict, bool]:
    """(botocore's parse of the page, the parse after read_contents_first, whether the handler took the page)."""
    def parse(response: dict) -> dict:
        return botocore.parsers.create_parser("rest-xml").parse(response, LIST_V2.output_shape)

    plain = parse({"status_code": status, "headers": {}, "body": body})
    response, custom = {"status_code": status, "headers": {}, "body": body}, {}
    read_contents_first(response_dict=response, customized_response_dict=custom, operation_model=LIST_V2)
    fast = parse(response)
    fast.update(custom)  # what botocore's endpoint does with the handler's dict
    return plain, fast, bool(custom)


def page(*contents: str, top: str = "<Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount>"
                                   "<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult {NS}>{top}'
            + "".join(f"<Contents>{c}</Contents>" for c in contents) + "</ListBucketResult>").encode()


FULL = ("<Key>p/a &amp; b &lt;c&gt; é 漢 +%.json</Key><LastModified>2026-12-06T23:39:22.123Z</LastModified>"
        "<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag><ChecksumAlgorithm>CRC32</ChecksumAlgorithm>"
        "<ChecksumAlgorithm>SHA256</ChecksumAlgorithm><ChecksumType>FULL_OBJECT</ChecksumType><Size>1234567890123</Size>"
        "<StorageClass>GLACIER</StorageClass><Owner><DisplayName>me</DisplayName><ID>75aa57f09aa0c8caeab4f8c24e99d10f8e7"
        "faeebf76c078efc7c6caea54ba06a</ID></Owner><RestoreStatus><IsRestoreInProgress>true</IsRestoreInProgress>"
        "<RestoreExpiryDate>2027-01-01T00:00:00.000Z</RestoreExpiryDate></RestoreStatus><SomethingNew>x</SomethingNew>")


def test_every_member_of_a_listed_key_is_read_as_botocore_reads_it():
    plain, fast, taken = parse_both(page(FULL, "<Key>p/b</Key><LastModified>2026-12-06T23:39:22Z</LastModified>"
                                               "<ETag></ETag><Size>0</Size><StorageClass/>",
                                         top="<Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>2"
                                             "</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
                                             "<NextContinuationToken>tok+/=</NextContinuationToken>"
                                             "<StartAfter>p/0</StartAfter><CommonPrefixes><Prefix>p/x/</Prefix>"
                                             "</CommonPrefixes>"))
    assert taken
    plain.pop("ResponseMetadata"), fast.pop("ResponseMetadata")
    assert fast == plain
    assert [list(item) for item in fast["Contents"]] == [list(item) for item in plain["Contents"]]  # same order
    first = fast["Contents"][0]
    assert first["ChecksumAlgorithm"] == ["CRC32", "SHA256"] and first["Size"] == 1234567890123
    assert first["RestoreStatus"]["IsRestoreInProgress"] is True and "SomethingNew" not in first
    assert fast["Contents"][1]["ETag"] == "" and fast["Contents"][1]["StorageClass"] == ""
    assert fast["NextContinuationToken"] == "tok+/=" and fast["CommonPrefixes"] == [{"Prefix": "p/x/"}]


def test_random_pages_read_as_botocore_reads_them():
    rng = random.Random(20261207)
    alphabet = "abcXYZ019 _-./+%&<>'\"é漢🙂"
    for _ in range(50):
        items = []
        for _ in range(rng.randrange(1, 40)):
            key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
            key = key.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            items.append(f"<Key>{key}</Key><LastModified>20{rng.randrange(10, 40)}-0{rng.randrange(1, 10)}-1"
                         f"{rng.randrange(10)}T0{rng.randrange(10)}:1{rng.randrange(10)}:2{rng.randrange(10)}."
                         f"{rng.randrange(1000):03d}Z</LastModified><ETag>\"{rng.getrandbits(128):032x}\"</ETag>"
                         f"<Size>{rng.randrange(10**12)}</Size><StorageClass>STANDARD</StorageClass>")
        plain, fast, taken = parse_both(page(*items))
        assert taken and fast == plain


def test_a_carriage_return_outside_the_keys_reads_as_botocore_reads_it():
    plain, fast, taken = parse_both(page("<Key>a&#13;b</Key><Size>1</Size>",
                                         top="<Name>b</Name><Prefix>p&#13;</Prefix><CommonPrefixes><Prefix>p/a&#13;"
                                             "b/</Prefix></CommonPrefixes>"))
    assert not taken and fast == plain and plain["Prefix"] == "p\r" and plain["Contents"][0]["Key"] == "a\rb"
    plain, fast, taken = parse_both(page("<Key>a&#13;b</Key><Size>1</Size>"))  # in a key: read as botocore does
    assert taken and fast == plain and fast["Contents"][0]["Key"] == "a\rb"


@pytest.mark.parametrize("body, status", [
    (page("<Key>a</Key><Key>b</Key><Size>1</Size>"), 200),  # a repeated member: botocore makes a list of it
    (page("<Key>a</Key><Size>one</Size>"), 200),  # not a number: botocore's own error
    (page("<Key>a</Key><Size>1</Size><Owner><ID>x</ID></Owner><Owner><ID>y</ID></Owner>"), 200),
    (page("<Key>a<i>b</i></Key><Size>1</Size>"), 200),  # markup in a value
    (page("<Key>a</Key><LastModified>yesterday</LastModified>"), 200),
    (page("<Key>a</Key>")[:-5], 200),  # cut short: not XML
    (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>", 503),
    # A carriage return in another field: the page written back without its keys would read it as \n.
    (page("<Key>a</Key><Size>1</Size>", top="<Name>b</Name><Prefix>p&#13;</Prefix>"), 200),
    (page("<Key>a</Key><Size>1</Size>", top="<X>" * 1200 + "</X>" * 1200), 200),  # too deep to write back
])
def test_pages_it_is_not_sure_of_are_left_to_botocore(body, status):
    response, custom = {"status_code": status, "headers": {}, "body": body}, {}
    read_contents_first(response_dict=response, customized_response_dict=custom, operation_model=LIST_V2)
    assert response["body"] is body and custom == {}


def test_real_listings_are_the_same_with_the_fast_pages(s3_server):
    fs = s3_server.filesystem()
    fs.mkdir("fastpages")
    names = ["a b.json", "a&b<c>.json", "é/漢 🙂.parquet", "x+y%20z.txt", "deep/er/file", "folder/", "q'\"uote"]
    fs.pipe({f"fastpages/p/{name}": bytes(i) for i, name in enumerate(names)})
    taken = []

    def counted(**kwargs):
        read_contents_first(**kwargs)
        taken.append(bool(kwargs["customized_response_dict"]))

    def listing(fast: bool) -> list[dict]:
        session = botocore.session.get_session()
        if fast:
            session.register(s3_listing.EVENT, counted)
        client = session.create_client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        pages = [client.list_objects_v2(Bucket="fastpages", Prefix="p/", MaxKeys=3)]
        while pages[-1].get("IsTruncated"):
            pages.append(client.list_objects_v2(Bucket="fastpages", Prefix="p/", MaxKeys=3,
                                                ContinuationToken=pages[-1]["NextContinuationToken"]))
        for one in pages:
            one.pop("ResponseMetadata")
        return pages

    fast = listing(True)
    assert taken == [True] * 3  # every page read by the handler
    assert fast == listing(False)
    # botocore's URL-decoding of keys (EncodingType=url) still applies to the handler's keys.
    assert sorted(item["Key"] for one in fast for item in one["Contents"]) == sorted(f"p/{n}" for n in names)


def test_the_s3_filesystem_reads_its_pages_fast(s3_server, monkeypatch):
    s3_server.filesystem().pipe({f"fastfs/p/{i}.json": bytes(i) for i in range(7)})
    before = list(botocore.handlers.BUILTIN_HANDLERS)
    # Options no other test uses: a filesystem of its own, whose aiobotocore session is made after the handler
    # is registered.
    fs, root = filesystem("s3://fastfs/p", dict(s3_server.storage_options(), default_block_size=3 * 2**20))
    use_fast_s3_listings()
    assert (s3_listing.EVENT, read_contents_first) in botocore.handlers.BUILTIN_HANDLERS
    assert len(botocore.handlers.BUILTIN_HANDLERS) - len(before) <= 1  # registered once, however often asked
    read = []
    reader = s3_listing._read
    monkeypatch.setattr(s3_listing, "_read", lambda *args: read.append(1) or reader(*args))
    session = aiobotocore.session.AioSession()
    session.unregister(s3_listing.EVENT, read_contents_first)  # botocore's own reading, for comparison
    plain = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": s3_server.endpoint},
                              session=session, skip_instance_cache=True).find("fastfs/p", detail=True)
    assert read == []
    found = fs.find(root, detail=True)
    assert len(read) == 7  # every listed key read by the handler, through s3fs's aiobotocore client
    assert {name: (info["size"], info["ETag"], info["LastModified"]) for name, info in found.items()} == \
        {name: (info["size"], info["ETag"], info["LastModified"]) for name, info in plain.items()}


# ---- key ranges -----------------------------------------------------------------------------------------------------


@pytest.fixture
def ranged(s3_server, monkeypatch):
    """(filesystem through a counting proxy, the proxy): ranges of 10 expected keys, up to 32 of them."""
    monkeypatch.setattr(s3_listing, "RANGE_KEYS", 10)
    proxy = LatencyProxy(s3_server.port, delay=0)
    fs, _ = filesystem("s3://ranges", dict(s3_server.storage_options(), endpoint_url=proxy.endpoint))
    if not fs.exists("ranges"):
        fs.mkdir("ranges")
    yield fs, proxy
    proxy.close()


def test_ranges_find_every_file_expected_or_not(ranged):
    fs, proxy = ranged
    rng = random.Random(7)
    names = [f"out/part-{i:05d}.parquet" for i in range(300)] + [f"out/_tasks/{rng.getrandbits(80):020x}.json"
                                                               for _ in range(200)]
    names += ["out/a/", "out/a/b", "out/a0", "out/é", "out/漢/x", "out/~", "out/part-00150.parquet.x"]
    fs.pipe({f"ranges/{name}": name.encode() for name in names})
    fs.pipe({"ranges/outer": b"", "ranges/out0": b"", "ranges/out-": b""})  # beside the folder, never in it
    plain = fs.find("ranges/out", detail=True)
    expected = [f"ranges/{name}" for name in names[:500:2]]  # half expected; the others are found all the same
    expected += [f"ranges/out/part-{i:05d}.missing" for i in range(40)]  # expected, not there
    proxy.log.clear()
    found = find_in_ranges(fs, "ranges/out", expected)
    assert found is not None and sorted(found) == sorted(plain) == sorted(f"ranges/{name}" for name in names)
    for name, info in found.items():
        assert {k: info[k] for k in ("name", "Key", "size", "Size", "type", "ETag", "LastModified")} == \
               {k: plain[name][k] for k in ("name", "Key", "size", "Size", "type", "ETag", "LastModified")}
    lists = [path for kind, path, _ in proxy.log if kind == "LIST"]
    starts = {dict(urllib.parse.parse_qsl(p.partition("?")[2])).get("start-after") for p in lists}
    assert len(starts) == 29  # 290 expected keys under out/: 29 ranges, the first from the start (None)
    assert len(lists) < 29 * 3  # each range asks for what it should still hold: few pages, little listed twice
    # A sample of the names, each standing for 2, cuts as many ranges and finds the same.
    proxy.log.clear()
    assert find_in_ranges(fs, "ranges/out", expected[::2], weight=2).keys() == found.keys()
    assert len({dict(urllib.parse.parse_qsl(p.partition("?")[2])).get("start-after")
                for kind, p, _ in proxy.log if kind == "LIST"}) == 29
    # find_sizes_fresh takes the same way and gives the same sizes.
    proxy.log.clear()
    assert find_sizes_fresh(fs, "ranges/out", expected) == find_sizes_fresh(fs, "ranges/out")
    assert len({dict(urllib.parse.parse_qsl(p.partition("?")[2])).get("start-after")
                for kind, p, _ in proxy.log if kind == "LIST"}) == 29


def test_a_store_listing_in_another_order_is_listed_the_plain_way(ranged):
    """SeaweedFS lists a folder's keys right after the folder's name: ``020/x`` before ``020-`` (byte order,
    S3's, puts ``-`` before ``/``). Two ranges cut at ``020-`` would miss ``020/x`` and ``020/y`` (the first
    stops at ``020/x``, past its end; the second starts after ``020-``): the order check of the first page
    sees it, and the plain listing is taken."""
    fs, proxy = ranged
    names = [f"tree/{i:03d}" for i in range(40)] + ["tree/020-", "tree/020/x", "tree/020/y"]
    fs.pipe({f"ranges/{name}": b"" for name in names})
    served = [item["Key"] for item in fs.call_s3("list_objects_v2", Bucket="ranges", Prefix="tree/")["Contents"]]
    assert sorted(served) == sorted(names) and served != sorted(served)  # the server's order is not S3's
    expected = [f"ranges/tree/{i:03d}" for i in range(10)] + ["ranges/tree/020-"] + \
        [f"ranges/tree/{i:03d}" for i in range(30, 39)]  # 20 keys: two ranges, cut at tree/020-
    assert find_in_ranges(fs, "ranges/tree", expected) is None
    assert sorted(find_sizes_fresh(fs, "ranges/tree", expected)) == sorted(f"ranges/{name}" for name in names)


def test_ranges_that_do_not_join_are_listed_the_plain_way(ranged, monkeypatch):
    """A store whose StartAfter skips one key too many: every page in order, every key past StartAfter, but
    the key each range stopped at is listed by no range. Only the join check can see that."""
    fs, proxy = ranged
    fs.pipe({f"ranges/skipping/{i:03d}": b"" for i in range(60)})
    call = type(fs)._call_s3

    async def skipping(self, method, *args, **kwargs):
        answer = await call(self, method, *args, **kwargs)
        if method == "list_objects_v2" and "StartAfter" in kwargs and "ContinuationToken" not in kwargs:
            answer["Contents"] = answer.get("Contents", [])[1:]
        return answer

    monkeypatch.setattr(type(fs), "_call_s3", skipping)
    expected = [f"ranges/skipping/{i:03d}" for i in range(60)]
    assert find_in_ranges(fs, "ranges/skipping", expected) is None
    assert len(find_sizes_fresh(fs, "ranges/skipping", expected)) == 60


def test_ranges_of_many_pages_join_page_by_page(ranged, monkeypatch):
    """Ranges longer than a page: continuation tokens, MaxKeys asked anew per page, a stop key met on a
    later page than the range's first."""
    fs, proxy = ranged
    monkeypatch.setattr(s3_listing, "PAGE_KEYS", 4)
    monkeypatch.setattr(s3_listing, "RANGE_SLACK", 1)
    names = [f"ranges/paged/{i:04d}" for i in range(0, 200, 2)]  # 100 keys, 5 ranges of ~20 expected
    fs.pipe({name: b"x" for name in names + [f"ranges/paged/{i:04d}" for i in range(1, 60, 2)]})  # 30 unexpected
    proxy.log.clear()
    found = find_in_ranges(fs, "ranges/paged", names, weight=1)
    assert found is not None and sorted(found) == sorted(fs.find("ranges/paged"))
    lists = [path for kind, path, _ in proxy.log if kind == "LIST" and "prefix=paged" in path]
    assert len({dict(urllib.parse.parse_qsl(p.partition("?")[2])).get("start-after") for p in lists}) == 10
    assert len(lists) >= 130 // 4 and any("continuation-token=" in p for p in lists)


def test_a_store_refusing_start_after_is_listed_the_plain_way(ranged, monkeypatch):
    """Some S3-compatible stores answer a listing with StartAfter with 404 or 400: a store's error on the way to
    ranges never reads as an empty output (a resume would rerun everything), the plain listing decides."""
    fs, proxy = ranged
    fs.pipe({f"ranges/refusing/{i:03d}": b"" for i in range(60)})
    call = type(fs)._call_s3
    asked = []

    async def refusing(self, method, *args, **kwargs):
        if kwargs.get("StartAfter"):
            asked.append(kwargs["StartAfter"])
            raise FileNotFoundError("ranges/refusing")
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_call_s3", refusing)
    expected = [f"ranges/refusing/{i:03d}" for i in range(60)]
    assert find_in_ranges(fs, "ranges/refusing", expected) is None and asked
    assert len(find_sizes_fresh(fs, "ranges/refusing", expected)) == 60


def test_too_few_expected_keys_or_another_store_list_the_plain_way(ranged, tmp_path):
    fs, proxy = ranged
    fs.pipe({f"ranges/few/{i}": b"" for i in range(25)})
    assert find_in_ranges(fs, "ranges/few", [f"ranges/few/{i}" for i in range(19)]) is None  # one range
    assert find_in_ranges(fs, "ranges/few", [f"ranges/few/{i}" for i in range(20)]) is not None
    assert find_in_ranges(fs, "ranges/few", [f"other/few/{i}" for i in range(25)]) is None  # not under root
    assert find_in_ranges(fs, "ranges/nothing", [f"ranges/nothing/{i}" for i in range(25)]) is None  # empty
    local, root = filesystem(str(tmp_path))
    assert find_in_ranges(local, root, [f"{root}/{i}" for i in range(100)]) is None


def test_a_store_listing_out_of_order_is_listed_the_plain_way(ranged, monkeypatch):
    """An S3 directory bucket lists keys in no order: ranges cut by string order would miss keys."""
    fs, proxy = ranged
    fs.pipe({f"ranges/unordered/{i:03d}": b"" for i in range(60)})
    call = type(fs)._call_s3

    async def shuffled(self, method, *args, **kwargs):
        answer = await call(self, method, *args, **kwargs)
        if method == "list_objects_v2":
            answer["Contents"] = answer.get("Contents", [])[::-1]
        return answer

    monkeypatch.setattr(type(fs), "_call_s3", shuffled)
    assert find_in_ranges(fs, "ranges/unordered", [f"ranges/unordered/{i:03d}" for i in range(60)]) is None
    assert len(find_sizes_fresh(fs, "ranges/unordered", [f"ranges/unordered/{i:03d}" for i in range(60)])) == 60
