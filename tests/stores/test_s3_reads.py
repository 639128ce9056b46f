"""How executors read their input on S3, request by request (tests/s3server.py's proxy logs every request):
a small file is one GET of the whole object, a large one a file object; both give the same bytes out."""

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job, run_sequentially
from clip_nsfw_spark.errors import InputChangedError
from clip_nsfw_spark.executor import reader
from clip_nsfw_spark.storage.filesystem import find_fresh
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy

BUCKET = "reads"


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


def outputs(fs, root) -> dict[str, bytes]:
    return {path[len(root):]: fs.cat_file(path) for path in sorted(find_fresh(fs, root)) if path.endswith(".parquet")}


def input_requests(proxy) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for kind, path, _ in proxy.log:
        if path.startswith(f"/{BUCKET}/in/part-"):
            found.setdefault(path, []).append(kind)
    return found


@needs_models
def test_a_small_input_file_is_one_get_and_a_large_one_a_file_object_with_the_same_output(proxied, monkeypatch):
    fs, options, proxy = proxied
    whole = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/whole", storage_options=options))
    # Each file: one GET of its footer when planned, then its task's one GET of the whole file, and no HEAD;
    # the first file also the driver's read of its first rows (the embedding width): footer and data.
    expected = {f"/{BUCKET}/in/part-0000{i}.parquet": ["GET", "GET"] for i in range(3)}
    expected[f"/{BUCKET}/in/part-00000.parquet"] += ["GET", "GET"]
    assert input_requests(proxy) == expected
    proxy.log.clear()
    monkeypatch.setattr(reader, "WHOLE_FILE_BYTES", 1000)  # every file larger: read through a file object
    opened = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/opened", storage_options=options))
    for path, kinds in input_requests(proxy).items():
        if not path.endswith("part-00000.parquet"):
            assert kinds.count("GET") >= 3, (path, kinds)  # planned, then the footer and the data read apart
    assert whole["rows"] == opened["rows"] and whole["rows"]["read"] == 900
    assert outputs(fs, f"{BUCKET}/whole") == outputs(fs, f"{BUCKET}/opened")  # byte for byte


@needs_models
def test_a_small_file_rewritten_after_planning_is_refused_before_anything_is_written(proxied):
    fs, options, _ = proxied
    fs.makedirs(f"{BUCKET}/changing", exist_ok=True)
    for i in range(2):
        fs.copy(f"{BUCKET}/in/part-0000{i}.parquet", f"{BUCKET}/changing/part-0000{i}.parquet")

    def rewrite_then_run(tasks, worker):  # between the plan and the tasks: the file grows by a byte
        path = f"{BUCKET}/changing/part-00001.parquet"
        fs.pipe_file(path, fs.cat_file(path) + b"\0")
        return run_sequentially(tasks, worker)

    with pytest.raises(InputChangedError, match=r"part-00001.parquet: it has more than ([\d,]+) bytes, the plan "
                                                r"listed \1: the file changed since it was planned"):
        run_job(JobConfig(input=f"s3://{BUCKET}/changing", output=f"s3://{BUCKET}/changed", storage_options=options),
                runner=rewrite_then_run)
    written = [path for path in find_fresh(fs, f"{BUCKET}/changed") if path.endswith("part-00001.parquet")]
    assert not written
