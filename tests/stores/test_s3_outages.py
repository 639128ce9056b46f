"""A store that fails for a moment (connections reset by a proxy in front of the real S3 server): the job says
it was the store, never that a sound file is damaged; a task retries; the end of a run fails cleanly.

botocore makes one attempt per call here (``total_max_attempts: 1``), but s3fs retries a reset connection
itself, and a GET that reads a body more again (50 requests for one failed read with s3fs 2026.x): cutting as
many requests in a row as one failed read makes (``_requests_per_failed_read``, measured) is one failure the
job sees, as an outage longer than the clients' retries would be."""

import pickle

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.driver.planner import plan
from clip_nsfw_spark.errors import ClipNsfwError, InputError, OutputError
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.spark.runner import partition_runner
from clip_nsfw_spark.storage.lease import RunLease
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy

NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


class Cut:
    """``(kind, path) → bool`` for the proxy: True for the next ``left`` requests of ``kind`` whose path
    contains ``needle`` (their connections are dropped before the request is through)."""

    def __init__(self, kind: str, needle: str, left: int, skip: int = 0):
        self.kind, self.needle, self.left, self.skip, self.hits = kind, needle, left, skip, []

    def __call__(self, kind: str, path: str) -> bool:
        if kind == self.kind and self.needle in path and self.skip > 0:  # the first ``skip`` pass
            self.skip -= 1
            return False
        if self.left > 0 and kind == self.kind and self.needle in path:
            self.left -= 1
            self.hits.append(path)
            return True
        return False


@pytest.fixture
def proxy(s3_server):
    proxy = LatencyProxy(s3_server.port, delay=0)
    proxy.cut_after = -1  # not even the request's last header byte: the client sees its connection reset
    yield proxy
    proxy.close()


def _bucket(s3_server, name: str):
    fs = s3_server.filesystem()
    if not fs.exists(name):
        fs.mkdir(name)
    return fs


def _options(s3_server, proxy) -> dict:
    return {**s3_server.storage_options(), "endpoint_url": proxy.endpoint, **NO_CLIENT_RETRIES}


def _requests_per_failed_read(s3_server, proxy) -> int:
    """How many GETs the clients make, retries included, before one read of a small file fails."""
    from clip_nsfw_spark.storage.filesystem import filesystem, read_fresh

    _bucket(s3_server, "outage-probe")
    s3_server.filesystem().pipe_file("outage-probe/probe.json", b"{}")
    fs, _ = filesystem("s3://outage-probe/probe.json", _options(s3_server, proxy))
    proxy.cut = Cut("GET", "/outage-probe/probe.json", left=10**6)
    with pytest.raises(Exception):
        read_fresh(fs, "outage-probe/probe.json")
    count, proxy.cut = len(proxy.cut.hits), None
    assert count >= 1
    return count


@pytest.mark.parametrize("files", [1, 3])  # one file: opened and read; several: their tails in one batched call
def test_a_footer_the_store_fails_to_serve_is_not_called_damaged(s3_server, proxy, files):
    """Review 18 found a reset during planning reported as "The file is truncated or not parquet; fix or
    remove it": a user could delete a sound file on that advice."""
    bucket = f"outage-plan-{files}"
    _bucket(s3_server, bucket)
    write_parquet_sample(f"s3://{bucket}/in", rows=300, files=files, dim=4, storage_options=s3_server.storage_options())
    proxy.cut = Cut("GET", f"/{bucket}/in/part-", left=10**6)
    with pytest.raises(InputError) as raised:
        plan(JobConfig(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out", storage_options=_options(s3_server, proxy)))
    message = str(raised.value)
    assert proxy.cut.hits and "the store failed to serve it" in message and "truncated or not parquet" not in message
    assert f"s3://{bucket}/in/part-0000" in message and "remove it" not in message
    proxy.cut = None  # the store answers again: the same files plan
    assert len(plan(JobConfig(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out",
                              storage_options=_options(s3_server, proxy))).tasks) == files


def test_a_damaged_footer_is_still_called_damaged_on_s3(s3_server, proxy):
    fs = _bucket(s3_server, "outage-damaged")
    write_parquet_sample("s3://outage-damaged/in", rows=200, files=2, dim=4, storage_options=s3_server.storage_options())
    fs.pipe_file("outage-damaged/in/part-00001.parquet", b"PAR1" + b"\x00" * 500)
    with pytest.raises(InputError, match=r"part-00001.parquet: .*truncated or not parquet"):
        plan(JobConfig(input="s3://outage-damaged/in", output="s3://outage-damaged/out",
                       storage_options=_options(s3_server, proxy)))


def test_a_lease_read_the_store_fails_at_commit_is_retried_not_fatal(s3_server, proxy):
    """A task reads the lease before it commits; the store failing that read was an OutputError, which fails
    the whole run at once ("check the credentials"). It is a TaskError now: retried in place, the task
    completes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "executor"))
    from test_worker import HEAD, FirstValueFactory  # a real worker with a stand-in head: no model needed

    from clip_nsfw_spark.contract import ScoreOutput, ScoreTarget, TaskConfig
    from clip_nsfw_spark.executor.worker import Worker

    fs = _bucket(s3_server, "outage-lease")
    write_parquet_sample("s3://outage-lease/in", rows=200, files=1, dim=4, storage_options=s3_server.storage_options())
    options = _options(s3_server, proxy)
    planned = plan(JobConfig(input="s3://outage-lease/in", output="s3://outage-lease/out", storage_options=options))
    with RunLease(fs, "outage-lease/out") as lease:
        config = TaskConfig(input="s3://outage-lease/in", output="s3://outage-lease/out", storage_options=options,
                            layout="parquet", mode="annotate", keep="safe",
                            targets=(ScoreTarget("embedding", (ScoreOutput("p", 0, 0.5),)),), reason_column="why",
                            write_columns=None, row_ids=False, write_embeddings=False, compression="zstd",
                            batch_rows=100, histogram_bins=10, run_id=lease.run_id, overlap=False)
        worker = Worker(config, (HEAD,), make_scorer=FirstValueFactory(4))
        one_failure = _requests_per_failed_read(s3_server, proxy)
        proxy.cut = Cut("GET", "/_clip_nsfw_lease.json", left=one_failure)
        record = pickle.loads(next(iter(partition_runner(worker)(iter([list(planned.tasks)])))))
    assert len(proxy.cut.hits) == one_failure, proxy.cut.hits  # the first attempt met the failure …
    assert record["errors"] == [] and record["figures"]["rows_read"] == 200  # … the second committed
    assert fs.exists("outage-lease/out/part-00000.parquet")


@needs_models
def test_the_store_failing_at_the_end_of_a_run_is_one_clear_error_and_resume_finishes(s3_server, proxy):
    """The report and _SUCCESS are written last, outside the tasks: the store failing there raised botocore's
    own error (a traceback from the command line). Now an OutputError naming the output; no _SUCCESS; a
    --resume writes both."""
    fs = _bucket(s3_server, "outage-end")
    write_parquet_sample("s3://outage-end/in", rows=300, files=2, storage_options=s3_server.storage_options())
    config = JobConfig(input="s3://outage-end/in", output="s3://outage-end/out",
                       storage_options=_options(s3_server, proxy))
    proxy.cut = Cut("PUT", f"/outage-end/out/{REPORT_NAME}", left=10**6)
    with pytest.raises(OutputError, match=r"cannot access output s3://outage-end/out: .*") as raised:
        run_job(config)
    assert isinstance(raised.value, ClipNsfwError) and proxy.cut.hits
    assert "The store did not answer" in str(raised.value) and "credentials" not in str(raised.value)
    assert not fs.exists(f"outage-end/out/{SUCCESS_NAME}")
    proxy.cut = None
    import dataclasses

    again = run_job(dataclasses.replace(config, resume=True))
    assert again["tasks_resumed"] == 2 and again["rows"]["read"] == 300
    assert fs.exists(f"outage-end/out/{SUCCESS_NAME}") and fs.exists(f"outage-end/out/{REPORT_NAME}")


def test_a_lease_whose_read_back_the_store_fails_is_not_left_behind(s3_server, proxy):
    """Taking a lease on S3 is: read it (absent), write it, read it back. Review 18: the store failing that
    read-back left the written lease behind, refusing every other run for two minutes. It is removed."""
    from clip_nsfw_spark.storage.filesystem import filesystem

    _bucket(s3_server, "outage-acquire")
    fs, root = filesystem("s3://outage-acquire/out", _options(s3_server, proxy))
    one_failure = _requests_per_failed_read(s3_server, proxy)
    proxy.cut = Cut("GET", "/_clip_nsfw_lease.json", left=one_failure, skip=1)  # not the first read: the read-back
    with pytest.raises(OutputError, match="The store did not answer"):
        with RunLease(fs, root):
            pass
    assert len(proxy.cut.hits) == one_failure
    assert not s3_server.filesystem().exists("outage-acquire/out/_clip_nsfw_lease.json")
    with RunLease(fs, root) as lease:  # another run takes it at once
        assert lease.run_id


def test_a_lease_the_store_fails_before_it_is_written_costs_no_second_round(s3_server, proxy):
    """Release after a failed acquire only when this run wrote a lease: a store failing the first read gets
    no release's requests (another round of retries, or of timeouts) after it (review 18)."""
    from clip_nsfw_spark.storage.filesystem import filesystem

    _bucket(s3_server, "outage-first-read")
    fs, root = filesystem("s3://outage-first-read/out", _options(s3_server, proxy))
    one_failure = _requests_per_failed_read(s3_server, proxy)
    proxy.cut = Cut("GET", "/_clip_nsfw_lease.json", left=one_failure)
    with pytest.raises(OutputError, match="The store did not answer"):
        with RunLease(fs, root):
            pass
    lease_requests = [kind for kind, path, _ in proxy.log if path.endswith("/outage-first-read/out/_clip_nsfw_lease.json")]
    assert lease_requests == ["GET"] * one_failure  # the failed reads, nothing written, no release after them
