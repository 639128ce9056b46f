"""Faster S3 listings: pages read without botocore's generic walker, and long listings in key ranges at once.

**Pages.** botocore parses a response by walking the service model's shapes for each XML element; with
s3_timestamps.py in place that walk was most of the CPU a listed key costs the driver. A resume of 100,000
tasks lists ~400,000 keys (the input's and the output's), on the one thread that runs the client's event
loop.

``use_fast_s3_listings`` registers ``read_contents_first`` for botocore's ``before-parse`` event of
ListObjectsV2 in every session made after it (s3fs's included). The handler reads a 200 page with
ElementTree, the parser botocore itself uses, turns its ``<Contents>`` elements into dicts with a reader
compiled once from the same ``Object`` shape (scalar members, flattened lists of scalars, structures of
scalars: what S3's model holds), hands botocore the page without them (so botocore parses the page's other
fields as before) and puts the dicts into the parsed response, where botocore's own after-call handlers
(the URL-decoding of keys) then see them as they would their own. Whatever the reader is not sure to read
as botocore does (a member repeated where botocore would make a list of it, an unparseable value, a model
with other kinds of members, a page that is not XML, a ``&#13;`` outside the keys that a page written back
would lose) leaves the page to botocore untouched. Timestamps are read with the process's default parser
(botocore's, or s3_timestamps'), as botocore's own parser does unless a client was given another one.

**Ranges.** A listing is a chain of pages, each asked for with the last one's continuation token: 400 pages
one after the other for 400,000 keys, each paying S3's latency and its server time. When the caller knows
most of the keys it will find (a resume: the output's names, the input's files of the last plan),
``find_in_ranges`` cuts the key space at some of them into ranges ``(b_i, b_i+1]`` and lists the ranges
together (``StartAfter=b_i``, stopping past ``b_i+1``): every key lies in exactly one range, keys nobody
expected included. S3 lists a general-purpose bucket's keys in UTF-8 byte order, which is Python's string
order; a store that lists out of that order (S3 directory buckets) is found by the order check of every
page, and the caller then lists the plain way.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ElementTree
from typing import Iterable

# botocore and fsspec.asyn are imported where S3 is used: a run on local files never needs them, and they were
# ~45 ms of every Python worker's start (python -X importtime, 2026-12-07)

log = logging.getLogger(__name__)

EVENT = "before-parse.s3.ListObjectsV2"
_SCALARS = frozenset({"string", "character", "integer", "long", "boolean", "timestamp"})


def _member_xml_name(name: str, shape) -> str:
    """The element name botocore looks for (``RestXMLParser._member_key_name``)."""
    if shape.type_name == "list" and shape.serialization.get("flattened"):
        inner = shape.member.serialization.get("name")
        if inner is not None:
            return inner
    return shape.serialization.get("name", name)


def _compile(shape) -> dict | None:
    """``{xml name: (member name, kind, nested reader)}`` for a structure of scalars, flattened lists of
    scalars and structures of scalars; None if it holds anything else (then botocore reads it)."""
    reader = {}
    for name, member in shape.members.items():
        if member.serialization.get("location") or member.serialization.get("xmlAttribute"):
            return None
        kind = member.type_name
        if kind in _SCALARS:
            nested = None
        elif kind == "list" and member.serialization.get("flattened") and member.member.type_name in _SCALARS:
            nested = member.member.type_name
        elif kind == "structure" and all(m.type_name in _SCALARS and not m.serialization.get("location")
                                         and not m.serialization.get("xmlAttribute")
                                         for m in member.members.values()):
            nested = _compile(member)
            if nested is None:
                return None
        else:
            return None
        reader[_member_xml_name(name, member)] = (name, kind, nested)
    return reader


class _NotSure(Exception):
    """Raised inside the reader for an element botocore would read otherwise: the page goes to botocore."""


def _tag(node) -> str:
    return node.tag.rpartition("}")[2]  # botocore strips ``{namespace}`` with ``{.*}``: the last ``}``


def _scalar(kind: str, node, timestamps):
    if len(node):
        raise _NotSure  # children where botocore expects text
    text = node.text if node.text is not None else ""  # botocore: an empty element is "", not None
    if kind in ("string", "character"):
        return text
    if kind in ("integer", "long"):
        return int(text)
    if kind == "boolean":
        return text == "true"
    return timestamps(text)


def _read(reader: dict, order: tuple, node, timestamps) -> dict:
    found = {}
    for child in node:
        entry = reader.get(_tag(child))
        if entry is None:
            continue  # botocore ignores elements its model does not name
        name, kind, nested = entry
        if kind == "list":
            found.setdefault(name, []).append(_scalar(nested, child, timestamps))
            continue
        if name in found:
            raise _NotSure  # botocore would hand a list of both to the member's handler
        if kind == "structure":
            found[name] = _read(nested, tuple(n for n, _, _ in nested.values()), child, timestamps)
        else:
            found[name] = _scalar(kind, child, timestamps)
    return {name: found[name] for name in order if name in found}  # in the model's order, as botocore's


def _contents_reader(operation_model):
    """(element name of a listed key, its reader, member order) for this model; None if the model's listed
    keys hold members the reader does not handle. (Compiled per page: ~20 µs, nothing kept per client.)"""
    contents = operation_model.output_shape.members.get("Contents")
    if contents is None or contents.type_name != "list" or not contents.serialization.get("flattened") \
            or contents.member.type_name != "structure":
        return None
    reader = _compile(contents.member)
    return None if reader is None else (_member_xml_name("Contents", contents), reader, tuple(contents.member.members))


def read_contents_first(response_dict: dict, customized_response_dict: dict, operation_model, **_) -> None:
    """botocore's ``before-parse`` handler for ListObjectsV2: see the module's docstring. Changes
    ``response_dict["body"]`` and ``customized_response_dict`` only when every listed key was read."""
    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not isinstance(body, bytes) or b"Contents" not in body:
        return
    compiled = _contents_reader(operation_model)
    if compiled is None:
        return
    element, reader, order = compiled
    import botocore.parsers  # imported already: botocore is what calls this

    timestamps = botocore.parsers.DEFAULT_TIMESTAMP_PARSER
    try:
        parser = ElementTree.XMLParser(target=ElementTree.TreeBuilder(), encoding="utf-8")  # as botocore's
        parser.feed(body)
        root = parser.close()
        rest = ElementTree.Element(root.tag, root.attrib)
        listed = []
        for child in root:
            if _tag(child) == element:
                listed.append(_read(reader, order, child, timestamps))
            else:
                rest.append(child)
        if not listed:
            return
        remainder = ElementTree.tostring(rest, encoding="utf-8")
    except (ElementTree.ParseError, _NotSure, ValueError, TypeError, OverflowError, RecursionError):
        return  # botocore reads it (and words the error of a page that is not XML)
    if b"\r" in remainder:  # a &#13; in the other fields: written back raw, it would be read as \n
        return
    response_dict["body"] = remainder
    customized_response_dict["Contents"] = listed


def use_fast_s3_listings() -> None:
    """Register ``read_contents_first`` in every botocore session made from now on in this process
    (idempotent). Sessions made before keep botocore's own reading. Without botocore nothing is done."""
    try:  # s3fs's dependencies: without them there is no S3 client to speed up
        import botocore.handlers
    except ImportError:  # pragma: no cover - the core install has no s3fs
        return
    if (EVENT, read_contents_first) not in botocore.handlers.BUILTIN_HANDLERS:
        botocore.handlers.BUILTIN_HANDLERS.append((EVENT, read_contents_first))


RANGE_KEYS = 5_000  # expected keys per range: ~5 pages each, so 32 requests in flight cover 160,000 keys
MAX_RANGES = 32  # ranges listed at once (each one request in flight)
SAMPLE_NAMES = 10_000  # callers sample at most about this many tasks or files (sample_every)
RANGE_SLACK = 50  # a range asks for this many keys more than it expects: a few unexpected ones, not a page
PAGE_KEYS = 1_000  # S3's page size


class _OutOfOrder(Exception):
    """The listing is not in Python's string order: ranges cut by that order could miss keys."""


def find_in_ranges(fs, root: str, expected: Iterable[str], weight: int = 1) -> dict[str, dict] | None:
    """``fs.find(root, detail=True)`` of an s3fs store, listed as key ranges at once; None when not done.

    ``expected``: paths (``bucket/key``, as ``fs.find`` names them) the caller expects under ``root``, or
    a sample of them where each stands for ``weight`` keys (every ``weight``-th, in any order: a million
    names need not be held to cut 32 ranges). They only choose where the ranges are cut (one range per
    RANGE_KEYS keys, at most MAX_RANGES), so a listing with files missing from them, or extra ones, is
    still whole. Returns ``{path: info}`` with the info s3fs's ``find`` gives a listed object (``name``,
    ``Key``, ``size``, ``type``, ``Size``, ``ETag``, ``LastModified`` …), folder placeholders (``name``
    ending ``/``) included as s3fs does.
    None (list the plain way) for another store, a version-aware one, fewer than two ranges' keys, an empty
    listing, or a store that does not list in string order. s3fs's listing cache is not filled.

    Why nothing is missed: each range lists the store's keys in the store's order from its start and stops
    at the first key past its end; that key must be the first the next range lists (or both none). So the
    ranges join end to end in whatever order the store lists, and cover its whole listing, as long as
    ``StartAfter=k`` means "after k's place in the store's own order" (S3's; also SeaweedFS's, which lists a
    folder's keys right after the folder's name, before ``a-`` when the folder is ``a/``). A store listing
    out of string order also fails the order check of every whole page, and is listed the plain way, as is
    any error met on the way (a store that refuses StartAfter, a key S3 cannot name).
    """
    if type(fs).__module__.split(".")[0] != "s3fs" or getattr(fs, "version_aware", True):
        return None
    bucket, key, _ = fs.split_path(root)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    head = bucket + "/"
    keys = sorted({path[len(head):] for path in expected if path.startswith(head + prefix)})
    count = min(MAX_RANGES, len(keys), len(keys) * weight // RANGE_KEYS)  # never two ranges cut at one key
    if count < 2:
        return None
    cuts = [None] + [keys[i * len(keys) // count] for i in range(1, count)] + [None]
    sizes = [((i + 1) * len(keys) // count - i * len(keys) // count) * weight for i in range(count)]
    from fsspec.asyn import sync

    try:
        parts = sync(fs.loop, _list_ranges, fs, bucket, prefix, list(zip(cuts, cuts[1:], sizes)))
    except Exception as err:  # noqa: BLE001 - out of order, StartAfter refused (some S3-compatible stores) …
        log.info("listing %s in key ranges failed (%s: %s): listing it the plain way", root, type(err).__name__,
                 err)
        return None  # the plain listing decides: the same answer, or the error it meets itself
    for (_, stop), (listed, next_stop) in zip(parts, parts[1:]):
        first = listed[0]["Key"] if listed else next_stop
        if stop != first:  # the next range does not start where this one ended: a gap or an overlap
            return None
    found = {}
    for listed, _ in parts:
        for item in listed:
            item["Key"] = item["name"] = head + item["Key"]  # as s3fs's _iterdir and _find name them
            item["size"], item["type"] = item["Size"], "file"
            found[item["name"]] = item
    return found or None


def sample_every(count: int) -> int:
    """The stride of a sample of ``count`` expected names that cuts ranges as well as all of them would."""
    return max(1, count // SAMPLE_NAMES)


async def _list_ranges(fs, bucket: str, prefix: str, ranges: list) -> list[tuple[list[dict], str | None]]:
    """Every range's ``_list_range``; the first error cancels the ranges still listing, and is raised."""
    tasks = [asyncio.ensure_future(_list_range(fs, bucket, prefix, *one)) for one in ranges]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    failed = [task.exception() for task in done if task.exception() is not None]
    if failed:
        raise failed[0]
    return [task.result() for task in tasks]


async def _list_range(fs, bucket: str, prefix: str, after: str | None, until: str | None,
                      estimated_keys: int) -> tuple[list[dict], str | None]:
    """``(objects, stop)``: the objects the store lists after key ``after`` (from the first without it) up
    to key ``until`` (to the end without it), and ``stop``, the first key it listed past ``until`` (None
    at the end of the listing). Raises _OutOfOrder for keys out of string order."""
    request = dict(Bucket=bucket, Prefix=prefix, **fs.req_kw)
    if after is not None:
        request["StartAfter"] = after
    listed, last = [], after
    while True:
        if until is not None:  # ask for what the range should still hold, not a full page past its end
            left = estimated_keys - len(listed)
            request["MaxKeys"] = PAGE_KEYS if left <= 0 else min(PAGE_KEYS, left + RANGE_SLACK)
        page = await fs._call_s3("list_objects_v2", **request)
        stop = None
        for item in page.get("Contents", ()):
            name = item["Key"]
            if (last is not None and name <= last) or not name.startswith(prefix):
                raise _OutOfOrder(name)  # the whole page is checked, past the range's end too
            last = name
            if stop is None and until is not None and name > until:
                stop = name
            elif stop is None:
                listed.append(item)
        if stop is not None:
            return listed, stop
        if not page.get("IsTruncated"):
            return listed, None
        request["ContinuationToken"] = page["NextContinuationToken"]
