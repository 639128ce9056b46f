"""Small job tasks share a Spark task (spark/runner.pack_tasks), and tasks' stats are summed where they run
(contract.add_figures): the driver holds one record per Spark task. The packing is pure; the last two tests run
the runner on real local Spark."""

import os
import sys

import pytest
from pyspark import cloudpickle

from clip_nsfw_spark.contract import REPORT_FIGURES, TASKS_SUMMED, Task, add_figures, sum_of_tasks
from clip_nsfw_spark.errors import DamagedInputError, InputError, OutputError, TaskError
from clip_nsfw_spark.spark.runner import (PARTITIONS_PER_CORE, TASK_COST_ROWS, lazy_spark_runner, pack_tasks,
                                          spark_runner)


def tasks(rows: list[int]) -> list[Task]:
    return [Task("parquet", f"/in/f{i:04d}.parquet", f"f{i:04d}.parquet", (0,), rows=n) for i, n in enumerate(rows)]


def test_every_task_lands_in_exactly_one_partition_and_heaviest_partitions_come_first():
    listed = tasks([10_000] * 1000 + [3_000_000, 0, 5])
    parts = pack_tasks(listed, cores=2)
    assert sorted(t.rel for part in parts for t in part) == sorted(t.rel for t in listed)
    weights = [sum(t.rows + TASK_COST_ROWS for t in part) for part in parts]
    assert weights == sorted(weights, reverse=True)
    assert parts[0] == [listed[1000]]  # the 3M-row task alone: heavier than a partition's share
    total = sum(t.rows + TASK_COST_ROWS for t in listed)
    assert len(parts) == -(-total // 1_000_000)  # 33 partitions for ~33M rows' weight


def test_partitions_weigh_about_the_same():
    listed = tasks([(i * 7919) % 50_000 for i in range(5000)])
    weights = [sum(t.rows + TASK_COST_ROWS for t in part) for part in pack_tasks(listed, cores=8)]
    assert max(weights) - min(weights) <= 50_000 + TASK_COST_ROWS  # LPT: within one task of each other


def test_few_tasks_keep_one_per_partition_and_small_inputs_still_use_every_core():
    assert pack_tasks(tasks([5] * 3), cores=2) == [[t] for t in sorted(tasks([5] * 3), key=lambda t: t.rel)]
    parts = pack_tasks(tasks([100] * 100), cores=4)
    assert len(parts) == 4 * PARTITIONS_PER_CORE  # 100 tiny tasks: not one Spark task, one per core × 4
    assert pack_tasks([], cores=4) == []


def test_packing_is_deterministic_whatever_the_order_tasks_come_in():
    listed = tasks([1000 * (i % 17) for i in range(3000)])
    names = lambda parts: [[t.rel for t in part] for part in parts]  # noqa: E731
    assert names(pack_tasks(listed, 2)) == names(pack_tasks(listed[::-1], 2))


def stats(task_id, rows, hist, rss=10.0, written=None):
    return {"task_id": task_id, "rows_read": rows, "rows_unsafe": 1, "rows_written": written or {"safe": rows - 1},
            "rejected_by_reason": {}, "stage_seconds": {"read": 0.5}, "histograms": {"p": hist},
            "outside_0_1": {"p": [0, 1]}, "unsafe_by_column": {"p": 1}, "worker_max_rss_mb": rss,
            "outputs": ["x"], "source": "s"}


def test_sums_of_sums_are_the_sum_and_the_peak_memory_is_the_largest():
    a, b, c = stats("a", 5, [1, 4]), stats("b", 7, [2, 5], rss=30.0, written={"unsafe": 1}), stats("c", 1, [0, 1])
    whole = add_figures(add_figures(add_figures({}, a), b), c)
    assert whole == {"rows_read": 13, "rows_unsafe": 3, "rows_written": {"safe": 4, "unsafe": 1},
                     "rejected_by_reason": {}, "stage_seconds": {"read": 1.5}, "stage_cpu_seconds": None,
                     "histograms": {"p": [3, 10]},
                     "outside_0_1": {"p": [0, 3]}, "unsafe_by_column": {"p": 3}, "worker_max_rss_mb": 30.0}
    split = sum_of_tasks([a, b])
    assert split[TASKS_SUMMED] == ["a", "b"] and set(split["figures"]) == set(REPORT_FIGURES)
    assert add_figures(split["figures"], c) == whole
    with pytest.raises(ValueError):  # histograms of different widths are never silently cut
        add_figures(whole, stats("d", 1, [1, 1, 1]))


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Spark's Python workers cannot import tests/


class StoreQuotaError(OutputError):
    """An error class that errors.py does not define: found by no name lookup, kept by value."""


class Recorder:
    """A worker: writes a marker per task run, reports the Spark partition it ran in as a stage, fails on
    demand (``InputError`` for names in ``bad``, a ``TaskError`` once for names in ``flaky``)."""

    def __init__(self, folder, bad=(), flaky=(), damaged=(), quota=()):
        self.folder, self.bad, self.flaky = str(folder), set(bad), set(flaky)
        self.damaged, self.quota = set(damaged), set(quota)

    def __call__(self, task):
        from pyspark import TaskContext

        marker = os.path.join(self.folder, task.rel)
        if task.rel in self.flaky and not os.path.exists(marker + ".failed"):
            open(marker + ".failed", "w").close()
            raise TaskError(f"task {task.rel}: injected transient failure")
        open(marker, "a").write("run\n")
        if task.rel in self.bad:
            raise InputError(f"cannot read {task.path}: injected")
        if task.rel in self.damaged:
            raise DamagedInputError(f"{task.path} is damaged: injected")
        if task.rel in self.quota:
            raise StoreQuotaError(f"no room for {task.rel}: injected")
        partition = TaskContext.get().partitionId()
        return stats(task.task_id, task.rows, [task.rows, 0]) | {"stage_seconds": {f"partition {partition}": 1.0}}


def test_small_tasks_share_spark_tasks_and_come_back_summed(spark, tmp_path):
    listed = tasks([10] * 40)
    results = spark_runner(spark)(listed, Recorder(tmp_path, flaky={"f0003.parquet"}))
    cores = spark.sparkContext.defaultParallelism
    assert len(results) == cores * PARTITIONS_PER_CORE < 40  # one record per Spark task
    assert sorted(i for r in results for i in r[TASKS_SUMMED]) == sorted(t.task_id for t in listed)
    per_partition = add_figures({}, {})
    for result in results:
        per_partition = add_figures(per_partition, result["figures"])
    assert per_partition["rows_read"] == 400 and per_partition["histograms"] == {"p": [400, 0]}
    by_partition = {k: v for k, v in per_partition["stage_seconds"].items() if k.startswith("partition ")}
    assert sorted(by_partition.values()) == [5.0] * (cores * PARTITIONS_PER_CORE)
    # and each Spark task's own seconds: its transfer, its batch state (a worker process's start and imports
    # come with its first Spark task of this package: none here if the session's workers ran tasks before)
    assert {"transfer", "commit"} <= set(per_partition["stage_cpu_seconds"])
    for task in listed:  # every task ran once; the flaky one again in place after its failure
        assert open(tmp_path / task.rel).read() == "run\n"


def test_the_lazy_runner_starts_its_session_only_for_work_and_once(spark, tmp_path):
    starts = []

    def start():
        starts.append(1)
        return spark

    run = lazy_spark_runner(start)
    assert run([], Recorder(tmp_path)) == [] and not starts and not run.started()  # nothing to run: no Spark
    listed = tasks([10] * 6)
    assert sorted(i for r in run(listed, Recorder(tmp_path)) for i in r[TASKS_SUMMED]) == sorted(t.task_id for t in listed)
    (tmp_path / "again").mkdir()
    assert run(listed[:2], Recorder(tmp_path / "again")) and starts == [1] and run.started()


def test_an_input_error_in_one_task_lets_the_others_of_its_spark_task_finish(spark, tmp_path):
    listed = tasks([10] * 40)
    with pytest.raises(InputError, match=r"^cannot read /in/f0007.parquet: injected\. The output is incomplete"):
        spark_runner(spark)(listed, Recorder(tmp_path, bad={"f0007.parquet"}))
    assert sorted(os.listdir(tmp_path)) == sorted(t.rel for t in listed)  # all 40 ran


def test_an_executors_error_comes_back_as_a_value_of_its_own_class(spark, tmp_path):
    """Errors cross back as typed values (the exception pickled with its message), not as class names in
    text: a subclass stays itself (DamagedInputError, not its base InputError or a TaskError)."""
    with pytest.raises(DamagedInputError) as raised:
        spark_runner(spark)(tasks([10] * 4), Recorder(tmp_path, damaged={"f0002.parquet"}))
    assert type(raised.value) is DamagedInputError
    assert str(raised.value).startswith("/in/f0002.parquet is damaged: injected. The output is incomplete")
    with pytest.raises(StoreQuotaError, match=r"^no room for f0001.parquet: injected\. The output is incomplete"):
        spark_runner(spark)(tasks([10] * 4), Recorder(tmp_path, quota={"f0001.parquet"}))


def test_an_error_the_driver_cannot_load_comes_back_as_a_task_error_with_its_name():
    """A class from a module only executors have cannot be unpickled on the driver: its name and message
    still reach the user, as a TaskError, and nothing else of the record is lost."""
    from clip_nsfw_spark.spark.runner import _as_value, _error_from

    sent = _as_value(DamagedInputError("/in/a.parquet is damaged: injected"))
    assert type(_error_from(sent)) is DamagedInputError
    unloadable = dict(sent, exception=b"\x80\x04\x95not a pickle", **{"class": "QuotaError"})
    error = _error_from(unloadable)
    assert type(error) is TaskError and str(error) == "QuotaError: /in/a.parquet is damaged: injected"


class _RefusingContext:
    """A SparkContext that refuses RDDs, as py4j allow-listing on shared clusters does."""

    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)

    def parallelize(self, *args, **kwargs):
        raise RuntimeError("py4j.security.Py4JSecurityException: Method public ... parallelize ... is not whitelisted")


class _SessionRefusingRdds:
    def __init__(self, spark):
        self._spark = spark

    def __getattr__(self, name):
        return getattr(self._spark, name)

    @property
    def sparkContext(self):
        return _RefusingContext(self._spark.sparkContext)


def test_parts_go_as_a_dataframe_where_the_spark_context_refuses_rdds(spark):
    from clip_nsfw_spark.spark.runner import map_parts

    def echo(parts):
        for part in parts:
            yield ",".join(map(str, part)).encode()

    assert sorted(map_parts(spark, [[1, 2], [3]], echo)) == [b"1,2", b"3"]  # the RDD's way
    assert sorted(map_parts(_SessionRefusingRdds(spark), [[1, 2], [3]], echo)) == [b"1,2", b"3"]


class _ContextWithoutJvm(_RefusingContext):
    """A SparkContext whose gateway refuses every call (py4j allow-listing on shared clusters)."""

    @property
    def _jvm(self):
        raise RuntimeError("py4j.security.Py4JSecurityException: ProcessHandle is not whitelisted")


class _SessionWithoutJvm(_SessionRefusingRdds):
    @property
    def sparkContext(self):
        return _ContextWithoutJvm(self._spark.sparkContext)


class _SessionWithoutContext(_SessionRefusingRdds):
    @property
    def sparkContext(self):
        raise RuntimeError("py4j.security.Py4JSecurityException: sparkContext is not whitelisted")


def test_the_idle_split_is_measured_only_where_the_machine_is_the_jobs_and_never_fails_a_run(spark):
    """spark/runner._whole_machine_jvm: the JVM's pid where a local master has every CPU of this machine,
    else None; refusals and odd answers give None, never an error (a measurement must not fail a job)."""
    from clip_nsfw_spark.spark.runner import _cpu_counters, _cpu_quota, _outside_workers, _whole_machine_jvm

    cores = spark.sparkContext.defaultParallelism
    pid = _whole_machine_jvm(spark, cores)
    if cores == os.cpu_count() == len(os.sched_getaffinity(0)) and not _cpu_quota():
        assert pid is not None and pid != os.getpid()
        with open(f"/proc/{pid}/comm") as comm:
            assert comm.read().strip() == "java"  # Spark's JVM, not this process nor a wrapper
    else:
        assert pid is None
    assert _whole_machine_jvm(spark, cores + 1) is None  # fewer cores than CPUs: the machine's idle is not ours
    assert _whole_machine_jvm(spark, None) is None
    assert _whole_machine_jvm(_SessionWithoutJvm(spark), cores) is None
    assert _whole_machine_jvm(_SessionWithoutContext(spark), cores) is None
    assert _cpu_counters(None) is None
    assert _cpu_counters(2 ** 22 + 12345) is None  # no such process (pids stop at 2^22): None, no error
    before = _cpu_counters(os.getpid())
    sum(i * i for i in range(200_000))  # some CPU of this process
    after = _cpu_counters(os.getpid())
    measured = _outside_workers(before, after)
    assert set(measured) == {"machine_idle", "stolen", "driver", "jvm", "window_seconds"}
    assert measured["driver"] > 0 and measured["window_seconds"] > 0
    assert min(measured.values()) >= 0
    assert _outside_workers(before, None) is None and _outside_workers(None, after) is None


def test_idle_by_source_takes_what_was_measured_and_calls_the_rest_other():
    from clip_nsfw_spark.driver.report import core_seconds

    totals = {"stage_cpu_seconds": {"score": 10.0, "decode": 2.0}}
    measured = {"machine_idle": 1.5, "stolen": 0.25, "driver": 0.5, "jvm": 1.0, "window_seconds": 9.5}
    account = core_seconds(totals, 2, 10.0, 1000, measured)
    assert account["by_stage"]["idle"] == 8.0
    assert account["idle_by_source"] == {"machine_idle": 1.5, "stolen": 0.25, "driver": 0.5, "jvm": 1.0,
                                         "unmeasured": 1.0, "other": 3.75}  # unmeasured: 2 cores × 0.5 s
    assert "idle_by_source" not in core_seconds(totals, 2, 10.0, 1000, None)


class _ContextOfMaster(_RefusingContext):
    def __init__(self, context, master):
        super().__init__(context)
        self.master = master


class _SessionOfMaster(_SessionRefusingRdds):
    """The real session, its SparkContext telling another master (what a user's --master would)."""

    def __init__(self, spark, master):
        super().__init__(spark)
        self._master = master

    @property
    def sparkContext(self):
        return _ContextOfMaster(self._spark.sparkContext, self._master)


def test_a_local_masters_cores_are_its_own_whatever_the_default_parallelism(spark):
    """spark.default.parallelism is a partitioning knob: the account's cores on a local master come from the
    master (local[1] with a parallelism of 2 runs on one core, and its idle is not split by the machine's)."""
    from clip_nsfw_spark.spark.runner import _local_cores, _whole_machine_jvm

    assert _local_cores(spark) == 2  # the tests' session is local[2]
    assert _local_cores(_SessionOfMaster(spark, "local")) == 1
    assert _local_cores(_SessionOfMaster(spark, "local[3, 2]")) == 3  # local[N, maxFailures]
    assert _local_cores(_SessionOfMaster(spark, "local[*]")) == spark.sparkContext._jvm.java.lang.Runtime \
        .getRuntime().availableProcessors()
    for master in ("local-cluster[2,1,1024]", "yarn", "spark://host:7077", "k8s://https://host:443"):
        assert _local_cores(_SessionOfMaster(spark, master)) is None
    assert _local_cores(_SessionWithoutContext(spark)) is None
    one_core = _SessionOfMaster(spark, "local[1]")
    assert spark_runner(one_core).cores == 1 != spark.sparkContext.defaultParallelism
    assert _whole_machine_jvm(one_core, 2) is None  # its parallelism of 2 does not make it the machine's


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cpu_quota_on_the_process_cgroup_or_above_turns_the_split_off(tmp_path, version):
    from clip_nsfw_spark.spark.runner import _cpu_quota

    mount = tmp_path / "cgroup"
    own = tmp_path / "self-cgroup"
    if version == "v1":
        own.write_text("4:memory:/jobs/run\n2:cpu,cpuacct:/jobs/run\n0::/\n")
        folder, name, unlimited, limited = mount / "cpu,cpuacct", "cpu.cfs_quota_us", "-1\n", "100000\n"
    else:
        own.write_text("0::/jobs/run\n")
        folder, name, unlimited, limited = mount, "cpu.max", "max 100000\n", "50000 100000\n"
    (folder / "jobs" / "run").mkdir(parents=True)
    assert not _cpu_quota(str(own), str(mount))  # no limit files: nothing says so
    for where in (folder, folder / "jobs", folder / "jobs" / "run"):
        (where / name).write_text(unlimited)
    assert not _cpu_quota(str(own), str(mount))
    (folder / "jobs" / name).write_text(limited)  # on the cgroup above the process's
    assert _cpu_quota(str(own), str(mount))
    (folder / "jobs" / name).write_text(unlimited)
    (folder / "jobs" / "run" / name).write_text(limited)  # on its own
    assert _cpu_quota(str(own), str(mount))
    assert not _cpu_quota(str(tmp_path / "no such file"), str(mount))
