"""A resume on S3 lists its input and its output in key ranges at once (storage/s3_listing.find_in_ranges), cut at
the names the last plan and this plan expect: what it finds must be what one listing finds, files nobody expected
included. Real S3 server through a counting proxy, real models; ranges of 2 expected keys so that 8 files make
several."""

import urllib.parse

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.storage import s3_listing
from clip_nsfw_spark.storage.filesystem import find_fresh
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy

BUCKET = "rangedresume"


@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """(filesystem, storage options through a counting proxy, the proxy); 8 files of 50 rows in BUCKET/in."""
    fs = s3_server.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
        write_parquet_sample(f"s3://{BUCKET}/in", rows=400, files=8, storage_options=s3_server.storage_options())
    monkeypatch.setattr(s3_listing, "RANGE_KEYS", 2)
    proxy = LatencyProxy(s3_server.port, delay=0)
    yield fs, dict(s3_server.storage_options(), endpoint_url=proxy.endpoint), proxy
    proxy.close()


def range_starts(proxy, folder: str) -> set:
    """The start-after keys of the LIST requests under ``folder`` (None: a listing from the start)."""
    queries = [dict(urllib.parse.parse_qsl(path.partition("?")[2])) for kind, path, _ in proxy.log if kind == "LIST"]
    return {query.get("start-after") for query in queries if query.get("prefix") == folder + "/"}


@needs_models
def test_a_resume_lists_in_ranges_and_misses_no_file(through_proxy):
    fs, options, proxy = through_proxy
    config = dict(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/out", storage_options=options)
    first = run_job(JobConfig(**config))
    outputs = {path: fs.cat_file(path) for path in find_fresh(fs, f"{BUCKET}/out") if path.endswith(".parquet")}
    assert len(outputs) == 8
    proxy.log.clear()
    again = run_job(JobConfig(resume=True, **config))
    assert again["tasks_resumed"] == 8 and again["rows"] == first["rows"]
    assert len(range_starts(proxy, "in")) == 4  # the input: 8 files of the last plan, 4 ranges
    assert len(range_starts(proxy, "out")) == 12  # the output: 8 tasks × (output, state, manifest), 12 ranges

    # A file nobody expects, between two expected names, is found: it is foreign, the resume is refused.
    fs.pipe_file(f"{BUCKET}/out/part-00003.parquet.copy.parquet", b"not ours")
    with pytest.raises(OutputError, match=r"part-00003\.parquet\.copy\.parquet"):
        run_job(JobConfig(resume=True, **config))
    fs.rm_file(f"{BUCKET}/out/part-00003.parquet.copy.parquet")

    # An expected output that is gone, and an input file nobody expected: both found.
    fs.rm_file(f"{BUCKET}/out/part-00005.parquet")
    fs.copy(f"{BUCKET}/in/part-00001.parquet", f"{BUCKET}/in/part-00001b.parquet")
    proxy.log.clear()
    rerun = run_job(JobConfig(resume=True, **config))
    assert rerun["resume"]["rerun_missing"] == ["part-00005.parquet"] and rerun["tasks_resumed"] == 7
    assert rerun["input"]["tasks"] == 9 and rerun["rows"]["read"] == first["rows"]["read"] + 50
    assert len(range_starts(proxy, "in")) == 4 and len(range_starts(proxy, "out")) == 13  # 9 tasks planned now
    now = {path: fs.cat_file(path) for path in find_fresh(fs, f"{BUCKET}/out") if path.endswith(".parquet")}
    assert {path: now[path] for path in outputs} == outputs and f"{BUCKET}/out/part-00001b.parquet" in now
