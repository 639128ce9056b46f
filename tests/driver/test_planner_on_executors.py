"""Planning above EXECUTOR_PLANNING_FILES footers on a remote store: the footers are read in Spark tasks
(planner.read_footers_here, run by spark/runner.footer_reader) and the plan is the one the driver makes
alone. Real local Spark, the real S3 server; the thresholds are lowered so that 12 files cross them."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver import planner
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import InputError
from clip_nsfw_spark.spark.runner import spark_runner
from clip_nsfw_spark.storage.filesystem import filesystem
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models


@pytest.fixture
def remote_input(s3_server, monkeypatch):
    fs = s3_server.filesystem()
    if not fs.exists("remoteplan"):
        fs.mkdir("remoteplan")
        write_parquet_sample("s3://remoteplan/in", rows=1200, files=12, row_group_rows=50,
                             storage_options=s3_server.storage_options())
    monkeypatch.setattr(planner, "EXECUTOR_PLANNING_FILES", 5)
    monkeypatch.setattr(planner, "FOOTERS_PER_SPARK_TASK", 5)  # 3 Spark tasks: 5, 5 and 2 footers
    return fs, s3_server.storage_options()


def test_footers_read_in_spark_tasks_make_the_drivers_plan(remote_input, spark, caplog):
    fs, options = remote_input
    config = JobConfig(input="s3://remoteplan/in", output="s3://remoteplan/out", storage_options=options,
                       rows_per_task=60)
    here = planner.plan(config)
    with caplog.at_level("INFO", logger="clip_nsfw_spark.driver.planner"):
        there = planner.plan(config, read_remotely=spark_runner(spark).read_footers)
    assert "reading 12 footers in Spark tasks of 5" in caplog.text
    assert there.tasks == here.tasks and len(there.tasks) == 24  # two slices of 50 rows per 100-row file
    assert there.schema.equals(here.schema) and there.total_rows == here.total_rows == 1200
    assert {path: f.digest for path, f in there.footers.items()} == {path: f.digest for path, f in here.footers.items()}


def test_a_damaged_file_read_in_a_spark_task_is_named(remote_input, spark):
    fs, options = remote_input
    fs.pipe("remoteplan/bad/part-00000.parquet", fs.cat_file("remoteplan/in/part-00000.parquet"))
    for i in range(1, 7):
        fs.pipe(f"remoteplan/bad/part-{i:05d}.parquet", fs.cat_file("remoteplan/in/part-00001.parquet"))
    fs.pipe("remoteplan/bad/part-00004.parquet", b"PAR1 not really")
    config = JobConfig(input="s3://remoteplan/bad", output="s3://remoteplan/out-bad", storage_options=options)
    with pytest.raises(InputError, match=r"cannot read parquet file s3://remoteplan/bad/part-00004\.parquet: "):
        planner.plan(config, read_remotely=spark_runner(spark).read_footers)


@needs_models
def test_a_job_planned_on_executors_scores_every_row_once(remote_input, spark, caplog):
    fs, options = remote_input
    with caplog.at_level("INFO", logger="clip_nsfw_spark.driver.planner"):
        report = run_job(JobConfig(input="s3://remoteplan/in", output="s3://remoteplan/scored",
                                   storage_options=options), runner=spark_runner(spark))
    assert "reading 12 footers in Spark tasks of 5" in caplog.text
    assert report["input"]["tasks"] == 12 and report["rows"]["read"] == 1200
    written = [p for p in fs.find("remoteplan/scored") if p.endswith(".parquet") and "/_" not in p]
    assert sum(pq.read_metadata(fs.open(p, "rb")).num_rows for p in written) == 1200


def test_footers_on_s3_are_one_ranged_get_each_and_a_long_footer_two(s3_server):
    """The driver's own reads (planner.read_footers, batched on s3fs's loop): one GET of the file's last
    FOOTER_TAIL bytes per file, no HEAD, no file object; a footer longer than that a second GET; the plan is
    the one a local read of the same bytes makes; a truncated file is named."""
    import s3fs

    from s3server import LatencyProxy

    fs = s3_server.filesystem()
    fs.mkdir("tailplan")
    write_parquet_sample("s3://tailplan/in", rows=300, files=6, row_group_rows=20,
                         storage_options=s3_server.storage_options())
    wide = pa.table({"embedding": pa.array([[0.5] * 4] * 40, pa.list_(pa.float32())),
                     **{f"column_{i:04d}_with_a_long_name": pa.array(range(40)) for i in range(3000)}})
    sink = pa.BufferOutputStream()
    pq.write_table(wide, sink, row_group_size=15)
    wide_bytes = sink.getvalue().to_pybytes()
    assert len(pq.read_metadata(pa.BufferReader(wide_bytes)).to_dict()) and len(wide_bytes) > planner.FOOTER_TAIL
    fs.pipe("tailplan/wide/part-00000.parquet", wide_bytes)
    fs.pipe("tailplan/wide/part-00001.parquet", wide_bytes)
    proxy = LatencyProxy(s3_server.port, delay=0)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        options = dict(s3_server.storage_options(), endpoint_url=proxy.endpoint)
        before = dict(proxy.kinds)
        plan = planner.plan(JobConfig(input="s3://tailplan/in", output="/tmp/unused", storage_options=options,
                                      rows_per_task=40))
        gets = [entry for entry in proxy.log if entry[0] == "GET"][before.get("GET", 0):]
        heads = [path for kind, path, _ in proxy.log if kind == "HEAD" and path.endswith(".parquet")]
        assert len(gets) == 6 and not heads  # HEADs only of the folder and the tool's marker names
        assert plan.total_rows == 300 and len(plan.tasks) == 12  # 50-row files of 20-row groups: 40 + 10 each
        logged = len(proxy.log)
        wide_plan = planner.plan(JobConfig(input="s3://tailplan/wide", output="/tmp/unused", storage_options=options))
        assert [entry[0] for entry in proxy.log[logged:]].count("GET") == 4  # tail, then the whole footer
        footer = wide_plan.footers[sorted(wide_plan.footers)[0]]
        assert footer.group_rows == (15, 15, 10) and wide_plan.schema.equals(wide.schema)
        fs.pipe("tailplan/odd/empty.parquet", b"")  # not fetched (a range 0..-1 would be the whole file)
        fs.pipe("tailplan/odd/changed.parquet", wide_bytes)
        odd = {path: fs.info(path) for path in ("tailplan/odd/changed.parquet", "tailplan/odd/empty.parquet")}
        fs.pipe("tailplan/odd/changed.parquet", wide_bytes[:1000])  # rewritten after it was listed
        proxied, _ = filesystem("s3://tailplan/odd", options)
        logged = len(proxy.log)
        empty, changed = planner.read_footers(proxied, odd, ["tailplan/odd/empty.parquet",
                                                             "tailplan/odd/changed.parquet"])
        assert [entry[1] for entry in proxy.log[logged:] if entry[0] == "GET"] == ["/tailplan/odd/changed.parquet"]
        assert "cannot read parquet file s3://tailplan/odd/empty.parquet" in str(empty)
        assert "changed while the input was planned: it was listed with" in str(changed) and "1,000 bytes" in str(changed)
        fs.pipe("tailplan/wide/part-00001.parquet", wide_bytes[:-20000] + wide_bytes[-8:])  # a footer cut short
        with pytest.raises(InputError, match=r"cannot read parquet file s3://tailplan/wide/part-00001\.parquet: "):
            planner.plan(JobConfig(input="s3://tailplan/wide", output="/tmp/unused", storage_options=options))
    finally:
        proxy.close()
