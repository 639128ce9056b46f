"""The commit protocol on S3, request by request (tests/s3server.py's proxy reads every request): each output
is uploaded once, straight to its final name (no temp object, no CopyObject, no delete); an upload broken
half-way is retried by the client, or, if it never gets through, leaves nothing under the name and a
``--resume`` finishes the task."""

import collections
import hashlib

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import ClipNsfwError
from clip_nsfw_spark.executor.writer import MANIFEST_DIR, REPORT_NAME, TASKS_DIR
from clip_nsfw_spark.storage.filesystem import find_fresh
from clip_nsfw_spark.storage.lease import LEASE_NAME
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy, request_kind

BUCKET = "commit"


@pytest.fixture
def proxied(s3_server):
    """(filesystem, storage options through a counting proxy without delay, the proxy); input in BUCKET/in."""
    fs = s3_server.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
        write_parquet_sample(f"s3://{BUCKET}/in", rows=900, files=3, storage_options=s3_server.storage_options())
    proxy = LatencyProxy(s3_server.port, delay=0)
    yield fs, dict(s3_server.storage_options(), endpoint_url=proxy.endpoint), proxy
    proxy.close()


def data_files(fs, root):
    """{key: size} of the output's data files (not the tool's own records)."""
    return {path: fs.info(path)["size"] for path in find_fresh(fs, root)
            if path.endswith(".parquet") and f"/{TASKS_DIR}/" not in path and f"/{MANIFEST_DIR}/" not in path}


def uploaded_once(proxy, path) -> int:
    """The size of the one whole PUT of ``path`` (the proxy's log holds the broken one too)."""
    sizes = [size for kind, logged, size in proxy.log if kind == "PUT" and logged == path]
    return sizes[-1]


def test_request_kinds_are_told_apart():
    assert request_kind("PUT", "/b/k", "", {"x-amz-copy-source": "/b/j"}) == "COPY"
    assert request_kind("PUT", "/b/k", "partNumber=1&uploadId=x", {}) == "MULTIPART_PART"
    assert request_kind("POST", "/b", "delete", {}) == "DELETE_MANY"
    assert request_kind("GET", "/b", "list-type=2&prefix=k", {}) == "LIST"
    assert (request_kind("GET", "/b/k", "", {}), request_kind("PUT", "/b/k", "", {})) == ("GET", "PUT")


@needs_models
def test_each_output_is_uploaded_once_under_its_final_name(proxied):
    fs, options, proxy = proxied
    report = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/once", storage_options=options,
                               mode="split", threshold=0.2))
    assert report["input"]["tasks"] == 3 and report["rows"]["read"] == 900
    outputs = data_files(fs, f"{BUCKET}/once")
    assert len(outputs) == 3 * 2  # safe/ and unsafe/ per task (no row is rejected: no file there)
    puts = collections.Counter(path for kind, path, _ in proxy.log if kind == "PUT")
    uploaded = {path: size for kind, path, size in proxy.log if kind == "PUT"}
    assert proxy.kinds["COPY"] == proxy.kinds["DELETE_MANY"] == proxy.kinds["MULTIPART_START"] == 0, proxy.kinds
    # Every key written once (the lease alone is rewritten: its heartbeat), none that is not there at the end.
    assert {path for path, n in puts.items() if n > 1} <= {f"/{BUCKET}/once/{LEASE_NAME}"}
    final = {"/" + path for path in find_fresh(fs, f"{BUCKET}/once")}
    assert set(puts) - {f"/{BUCKET}/once/{LEASE_NAME}"} == final
    for path, size in outputs.items():  # the bytes sent are the object's bytes: no second copy
        assert uploaded["/" + path] == size
    deletes = [path for kind, path, _ in proxy.log if kind == "DELETE"]
    assert deletes == [f"/{BUCKET}/once/{LEASE_NAME}"]  # the run's end; nothing else removed


@needs_models
def test_a_broken_upload_is_retried_by_the_client_and_leaves_one_whole_object(proxied):
    fs, options, proxy = proxied
    target = f"/{BUCKET}/retry/safe/part-00001.parquet"
    broken = []

    def cut_once(kind, path):
        if kind == "PUT" and path == target and not broken:
            broken.append(path)
            return True
        return False

    proxy.cut = cut_once
    report = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/retry", storage_options=options,
                               mode="split", threshold=0.2))
    assert broken == [target] and report["rows"]["read"] == 900
    assert [kind for kind, path, _ in proxy.log if path == target] == ["PUT", "PUT"]  # cut, then whole
    safe = [pq.read_table(f"{BUCKET}/retry/safe/part-0000{i}.parquet", filesystem=fs) for i in range(3)]
    assert sum(table.num_rows for table in safe) == report["rows"]["written"]["safe"]
    assert safe[1].num_rows > 0 and uploaded_once(proxy, target) == fs.info(target[1:])["size"]


@needs_models
def test_an_upload_that_never_gets_through_leaves_nothing_under_its_name_and_resume_finishes(proxied):
    fs, options, proxy = proxied
    config = dict(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/never", storage_options=options)
    target = f"/{BUCKET}/never/part-00001.parquet"
    proxy.cut = lambda kind, path: kind == "PUT" and path == target
    with pytest.raises(ClipNsfwError):
        run_job(JobConfig(**config))
    cut = [kind for kind, path, _ in proxy.log if path == target]
    assert len(cut) >= 2 and set(cut) == {"PUT"}  # the client retried, every attempt broken
    assert not fs.exists(target[1:])  # no partial object under the final name
    state = f"{BUCKET}/never/{TASKS_DIR}/{hashlib.sha1(b'part-00001.parquet').hexdigest()[:20]}.json"
    assert not fs.exists(state)  # the broken task is not recorded complete
    assert fs.exists(f"{BUCKET}/never/{MANIFEST_DIR}/{state.rsplit('/', 1)[-1]}")  # its manifest names the file
    proxy.cut = None
    report = run_job(JobConfig(**config, resume=True))
    assert report["rows"]["read"] == 900 and fs.exists(f"{BUCKET}/never/{REPORT_NAME}")
    assert pq.read_metadata(target[1:], filesystem=fs).num_rows == 300
