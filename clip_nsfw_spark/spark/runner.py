"""Spark glue, and the only module that imports pyspark.

The job's tasks are packed into Spark partitions (small tasks share a Spark task: ``pack_tasks``) and run by
``map_parts``: on classic Spark an RDD of one part per partition, on Spark Connect (no SparkContext, no
RDDs, no broadcast variables) a DataFrame of one part per row processed with ``mapInArrow``. The closure
carries the config and the portable weights (~2 MB); the tasks travel as data. Each Python worker builds
its scorer once (worker.scorer_for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import sys
import time

log = logging.getLogger(__name__)


@contextlib.contextmanager
def spark_session(master: str | None = None, app_name: str = "clip-nsfw-spark", conf: dict | None = None):
    """Yield the active SparkSession, or create one and stop it afterwards (and only then).

    ``master`` is a Spark master URL (``local[*]``, ``yarn``, ``k8s://…``) or a Spark Connect URL
    (``sc://host:15002``); None leaves it to spark-submit / the Spark defaults. ``conf`` adds Spark
    settings for a session this function creates.

    A created local session binds the driver (and its UI) to 127.0.0.1 and runs Python workers with this
    interpreter unless PYSPARK_PYTHON says otherwise. Local: ``master`` ``local…``, or None with no master
    in spark-submit's settings (``--master``) or a local one there (without spark-submit, None is taken as
    local: PySpark's own default). With ``CLIP_NSFW_PRELOAD=1``, where this process starts Spark itself (not
    spark-submit) on a local master and the workers' interpreter imports this very package from the same
    folder, the workers are forked from the preloading daemon (spark/daemon.py), unless a daemon module is
    set already (``conf``, PYSPARK_SUBMIT_ARGS, spark-defaults.conf).
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    started_by_spark_submit = "PYSPARK_GATEWAY_PORT" in os.environ  # its JVM, environment and settings
    builder = SparkSession.builder.appName(app_name)
    if master and master.startswith("sc://"):  # a Spark Connect server
        builder = builder.remote(master)
    elif master:
        builder = builder.master(master)
    # spark-submit's settings (its --master among them) are read from its JVM, which runs already; a JVM is
    # never started here before SPARK_LOCAL_IP is set (it would listen on every interface)
    # (SPARK_REMOTE=local… starts a Connect server on a local JVM here: that one is local, bound to loopback)
    connect = (master or os.environ.get("SPARK_REMOTE") or "").startswith("sc://")
    submitted = _submitted_settings() if started_by_spark_submit and not connect else {}
    if not connect and (master or submitted.get("spark.master") or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.showConsoleProgress", "false"))
        workers_python = os.environ["PYSPARK_PYTHON"]  # (a spark.pyspark.python that differs: no preload)
        if os.environ.get(PRELOAD_ENV, "") not in ("", "0") and not started_by_spark_submit \
                and DAEMON_MODULE_KEY not in (conf or {}) and not _daemon_module_set_elsewhere() \
                and (conf or {}).get("spark.pyspark.python", workers_python) == workers_python \
                and _imports_this_package(workers_python):
            builder = builder.config(DAEMON_MODULE_KEY, PRELOADING_DAEMON)
    builder = builder.config("spark.python.worker.reuse", "true")
    for key, value in (conf or {}).items():  # e.g. spark.driver.memory, before the JVM starts
        builder = builder.config(key, value)
    with _deferred_sigint():
        spark = builder.getOrCreate()
    _quiet_accumulator_server(spark)
    try:
        yield spark
    except BaseException:
        # The JVM may be gone already (SIGTERM to the whole process group): its error must not hide ours.
        with contextlib.suppress(Exception):
            spark.stop()
        raise
    spark.stop()


# PySpark's worker daemon replaced by one that loads this package before forking workers (spark/daemon.py)
DAEMON_MODULE_KEY = "spark.python.daemon.module"
PRELOADING_DAEMON = "clip_nsfw_spark.spark.daemon"
# Set (to anything but "" or "0"): local sessions started here fork their workers from the preloading daemon.
# Off by default: it saves each worker ~1.3 CPU seconds but loads everything before the first fork, one core
# busy while the others wait; with every core running one reused worker that cost the task phase wall time
# on local[2] (docs/performance.md). It pays where workers start again and again (idle workers stopped
# between jobs of a long session, spark.python.worker.reuse=false) and saves memory (shared pages).
PRELOAD_ENV = "CLIP_NSFW_PRELOAD"


def _submitted_settings() -> dict:
    """The Spark settings spark-submit's JVM (running already: PYSPARK_GATEWAY_PORT) was started with (its
    ``--master``/``--conf``, spark-defaults.conf); {} where they cannot be read."""
    try:
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()  # connects to spark-submit's gateway
        return dict(SparkConf().getAll())
    except Exception as err:  # noqa: BLE001 - a private PySpark call: never fatal, the builder's defaults apply
        log.debug("the Spark settings could not be read before the session: %s", err)
        return {}


def _daemon_module_set_elsewhere() -> bool:
    """True where the JVM this process starts will read a daemon module from PYSPARK_SUBMIT_ARGS or from
    spark-defaults.conf (SPARK_CONF_DIR, else SPARK_HOME/conf): the user's choice, which the builder's own
    setting would override."""
    if DAEMON_MODULE_KEY in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        return True
    folder = os.environ.get("SPARK_CONF_DIR")
    if not folder:
        home = os.environ.get("SPARK_HOME")
        if not home:  # where PySpark itself looks: the pip package's folder
            try:
                from pyspark.find_spark_home import _find_spark_home

                home = _find_spark_home()
            except (Exception, SystemExit):  # noqa: BLE001 - PySpark exits where it finds none
                return False
        folder = os.path.join(home, "conf")
    try:
        with open(os.path.join(folder, "spark-defaults.conf"), encoding="utf-8", errors="replace") as defaults:
            # Java properties: "key value", "key=value" or "key:value"
            return any(re.split(r"[\s=:]", line.strip(), maxsplit=1)[0] == DAEMON_MODULE_KEY for line in defaults)
    except OSError:
        return False


def _imports_this_package(python: str) -> bool:
    """True where ``python``, started here with this environment and folder (as the JVM this process
    starts will start PySpark's daemon), imports this package from the folder this process imported it from,
    and that folder holds the daemon module: never an older or another copy of it. Looked up without
    importing it (~0.05 s)."""
    import subprocess

    import clip_nsfw_spark

    here = os.path.realpath(os.path.dirname(clip_nsfw_spark.__file__))
    probe = ("import importlib.util, os; spec = importlib.util.find_spec('clip_nsfw_spark'); "
             "print(os.path.realpath(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations "
             "else '')")
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return found.returncode == 0 and found.stdout.strip() == here \
        and os.path.isfile(os.path.join(here, "spark", "daemon.py"))


def _quiet_accumulator_server(spark) -> None:
    """Keep a JVM that is gone from printing a Python traceback on stderr.

    PySpark's accumulator server (a ``socketserver`` thread in the driver) reads updates from the JVM; when
    SIGTERM reaches the whole process group the JVM dies first and that thread's read ends in EOFError,
    which ``socketserver`` prints as a traceback after our one-line message. A closed connection is logged
    at DEBUG instead; any other error keeps socketserver's report.
    """
    server = getattr(getattr(spark, "sparkContext", None), "_accumulatorServer", None) \
        if not _is_connect(spark) else None
    if server is None:
        return
    report = server.handle_error

    def handle_error(request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (EOFError, ConnectionError)):
            log.debug("accumulator connection from %s closed: %r", client_address, error)
            return
        report(request, client_address)

    server.handle_error = handle_error


def _spark_context(spark):
    """The session's SparkContext, or None where there is none (Spark Connect) or touching it raises."""
    if _is_connect(spark):
        return None
    try:
        return spark.sparkContext
    except Exception:  # noqa: BLE001 - e.g. py4j.security.Py4JSecurityException
        return None


def _is_connect(spark) -> bool:
    """True for a Spark Connect session (it has no SparkContext; touching one raises)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


@contextlib.contextmanager
def _deferred_sigint():
    """Hold Ctrl-C while Spark starts: interrupted half-way, the JVM prints stack traces and py4j logs
    "reentrant call" errors; held, the KeyboardInterrupt comes a moment later from a clean state."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# In-place attempts of a task that failed with an unexpected (possibly transient) error; a crashed Python
# worker is retried by Spark itself (spark.task.maxFailures).
TASK_ATTEMPTS = 3
# Small job tasks share a Spark task: Spark's own cost per task (scheduling, a Python worker round trip:
# ~0.1-0.3 s) would otherwise outweigh scoring a small file. A Spark task takes job tasks until they weigh
# about PARTITION_ROWS rows, each counting its rows plus TASK_COST_ROWS for its fixed cost (open, footer,
# commit, state: ~10 requests); at least PARTITIONS_PER_CORE Spark tasks per core keep every core busy.
PARTITION_ROWS = 1_000_000
TASK_COST_ROWS = 20_000
PARTITIONS_PER_CORE = 4
UNKNOWN_PARALLELISM = 16  # Spark Connect does not tell the cluster's cores


def pack_tasks(tasks: list, cores: int, partition_rows: int = PARTITION_ROWS) -> list[list]:
    """Job tasks (``contract.Task``) → Spark partitions: lists of tasks, heaviest partition first.

    As many partitions as the tasks' weight needs at ``partition_rows`` each, at least ``cores`` ×
    PARTITIONS_PER_CORE (never more than one per task). Tasks go heaviest first to the lightest partition
    (longest-processing-time first), so partitions weigh about the same; a task is never split. Deterministic:
    ties are broken by the task's output name.
    """
    import heapq

    if not tasks:
        return []
    weight = {id(task): task.weight + TASK_COST_ROWS for task in tasks}
    total = sum(weight.values())
    count = min(len(tasks), max(cores * PARTITIONS_PER_CORE, -(-total // max(partition_rows, 1))))
    partitions: list[list] = [[] for _ in range(count)]
    lightest = [(0, index) for index in range(count)]
    for task in sorted(tasks, key=lambda t: (-weight[id(t)], t.rel)):
        load, index = heapq.heappop(lightest)
        partitions[index].append(task)
        heapq.heappush(lightest, (load + weight[id(task)], index))
    return sorted(partitions, key=lambda part: -sum(weight[id(t)] for t in part))


def _cores(spark) -> int:
    """The cores to pack tasks for: Spark's default parallelism, else a guess (``UNKNOWN_PARALLELISM``)."""
    return _known_cores(spark) or UNKNOWN_PARALLELISM


def _known_cores(spark) -> int | None:
    """Spark's default parallelism where Spark tells it, else None (never a guess)."""
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext; a blocked one raises
        try:
            return int(spark.conf.get("spark.default.parallelism"))
        except Exception:  # noqa: BLE001
            return None


def spark_runner(spark, partition_rows: int = PARTITION_ROWS):
    """A runner for ``job.run_job``: job tasks packed into Spark tasks (``pack_tasks``), results summed there.

    Each Spark task runs its job tasks one after the other and sends back one record: the ids of the tasks
    that completed and their stats summed (contract.sum_of_tasks), plus the errors. The driver so holds one
    record per Spark task, not every task's stats.

    A task's error comes back as data, never as a failed Spark task, so the driver raises it as the same
    one-line error (naming the task's file) instead of Spark's and Py4J's stack traces: a known input
    problem (``InputError`` …) at once, since retrying cannot fix it; anything else (``TaskError``: I/O,
    the worker's environment) after ``TASK_ATTEMPTS`` attempts in place. The other tasks of its Spark task
    still run. A Spark task retried by Spark (a worker lost) runs its job tasks again: each rewrites the
    same names, as a retried task always did.
    """

    def run(tasks, worker):
        """Run ``worker`` (worker.Worker: Task → stats) over ``tasks``, packed into Spark tasks."""
        run.outside_workers = None
        if not tasks:
            return []
        if "jvm" not in machine:  # asked once: the JVM of a session does not change
            machine["jvm"] = _whole_machine_jvm(spark, run.cores)
        parts = pack_tasks(list(tasks), _cores(spark), partition_rows)
        process = partition_runner(worker, phase_started=time.time())
        counters = _cpu_counters(machine["jvm"])
        results = [pickle.loads(data) for data in map_parts(spark, parts, process)]
        run.outside_workers = _outside_workers(counters, _cpu_counters(machine["jvm"]))
        failed = [error for result in results for error in result.pop("errors")]
        if failed:
            more = f" ({len(failed) - 1} more tasks failed)" if len(failed) > 1 else ""
            first = _error_from(failed[0])
            raise type(first)(f"{str(first).rstrip('.')}{more}. The output is incomplete: fix the cause "
                              "and rerun with --resume.")
        return results

    run.read_footers = footer_reader(spark)
    # the task phase's core-seconds (the report's account of them): None where Spark does not tell its cores
    # (Spark Connect), rather than a guess; read when the runner is made (dynamic allocation may add more)
    run.cores = None if _is_connect(spark) else _local_cores(spark) or _known_cores(spark)
    run.outside_workers = None  # set by each run, where measurable (_whole_machine_jvm)
    machine: dict = {}
    return run


_LOCAL_MASTER = re.compile(r"local(?:\[\s*(\*|\d+)\s*(?:,\s*\d+\s*)?\])?")


def _local_cores(spark) -> int | None:
    """The cores of a local master (``local`` 1, ``local[N]`` / ``local[N, F]`` N, ``local[*]`` the JVM's
    processors): what its tasks really run on, whatever ``spark.default.parallelism`` says (users tune it for
    partitioning); None for any other master, or where Spark does not tell."""
    try:
        context = _spark_context(spark)
        found = _LOCAL_MASTER.fullmatch(context.master.strip()) if context is not None else None
        if found is None:
            return None
        if found.group(1) == "*":
            return int(context._jvm.java.lang.Runtime.getRuntime().availableProcessors())
        return int(found.group(1) or 1)
    except Exception:  # noqa: BLE001 - a refusing gateway: the default parallelism then
        return None


def _whole_machine_jvm(spark, cores: int | None) -> int | None:
    """The pid of Spark's JVM where a task phase's idle core-seconds can be split by source
    (driver/report.core_seconds), else None: a local master (``local`` or ``local[…]``; not ``local-cluster``,
    whose executors are other JVMs) whose ``cores`` are every CPU of this Linux machine, no cgroup CPU quota
    (then the machine's idle is the phase's). The JVM names its own pid (Java 9+: older JVMs, a gateway that
    refuses the call → None). Never raises: a measurement must not fail a run."""
    try:
        if not cores or not (cores == os.cpu_count() == len(os.sched_getaffinity(0))) or _cpu_quota():
            return None
        context = _spark_context(spark)
        if context is None or cores != _local_cores(spark):  # not local, or not the cores it runs on
            return None
        pid = int(context._jvm.java.lang.ProcessHandle.current().pid())
        return pid if os.path.exists(f"/proc/{pid}/stat") else None
    except Exception:  # noqa: BLE001 - not Linux, Java 8, py4j.security.Py4JSecurityException …
        return None


def _cpu_quota(own_cgroups: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> bool:
    """True where a cgroup limits this process's CPU time: a quota on its own cgroup or on any above it
    (v2 ``cpu.max`` other than ``max``, v1 ``cpu.cfs_quota_us`` other than -1). Then /proc/stat's idle CPUs
    are not this job's to use. False where nothing says so (no cgroups, unreadable files)."""
    try:
        with open(own_cgroups) as listed:
            lines = listed.read().splitlines()
    except OSError:
        return False
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2: one hierarchy
            roots, name, unlimited = [mount], "cpu.max", "max"
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own mount
            roots = [os.path.join(mount, folder) for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            name, unlimited = "cpu.cfs_quota_us", "-1"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for root in roots:
            for depth in range(len(parts), -1, -1):  # the process's cgroup, then each one above it
                try:
                    with open(os.path.join(root, *parts[:depth], name)) as limit:
                        if limit.read().split()[0] != unlimited:
                            return True
                except (OSError, IndexError):
                    continue
    return False


def _cpu_counters(jvm_pid: int | None) -> dict | None:
    """CPU seconds used so far by the machine (/proc/stat: ``idle`` = idle + iowait, ``stolen`` by the
    hypervisor), this driver process and Spark's JVM (``jvm_pid``: its utime + stime), and ``wall``
    (perf_counter seconds); None without a ``jvm_pid`` or where /proc cannot tell. Never raises."""
    if jvm_pid is None:
        return None
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as stat:  # cpu  user nice system idle iowait irq softirq steal …
            idle, iowait, _, _, steal = (int(v) for v in stat.readline().split()[4:9])
        with open(f"/proc/{jvm_pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        return {"idle": (idle + iowait) / tick, "stolen": steal / tick, "driver": time.process_time(),
                "jvm": (int(fields[11]) + int(fields[12])) / tick, "wall": time.perf_counter()}
    except Exception:  # noqa: BLE001 - the JVM gone, an odd /proc: no split, never a failed run
        return None


def _outside_workers(before: dict | None, after: dict | None) -> dict | None:
    """What two ``_cpu_counters`` around the tasks measured: ``machine_idle``, ``stolen``, ``driver`` and
    ``jvm`` CPU seconds, and ``window_seconds``, the wall seconds between them; None if either is missing."""
    if not before or not after:
        return None
    return {"machine_idle": after["idle"] - before["idle"], "stolen": after["stolen"] - before["stolen"],
            "driver": after["driver"] - before["driver"], "jvm": after["jvm"] - before["jvm"],
            "window_seconds": after["wall"] - before["wall"]}


def lazy_spark_runner(start_session, partition_rows: int = PARTITION_ROWS):
    """``spark_runner`` over a session that ``start_session()`` creates when first needed: when there are
    tasks to run, or footers to read on executors. A resume of a finished output then starts no Spark at
    all (locally a JVM, ~8 s; on a cluster, its executors) for a run that has nothing to give it."""
    started = []

    def runner():
        if not started:
            began = time.perf_counter()
            started.append(spark_runner(start_session(), partition_rows))
            run.startup_seconds = time.perf_counter() - began  # not the tasks' time: the job reports it apart
        return started[0]

    def run(tasks, worker):
        run.outside_workers = None
        if not tasks:
            return []
        started_runner = runner()
        run.cores = started_runner.cores
        try:
            return started_runner(tasks, worker)
        finally:
            run.outside_workers = started_runner.outside_workers

    run.cores = None
    run.outside_workers = None
    run.read_footers = lambda *args: runner().read_footers(*args)
    run.started = lambda: bool(started)
    run.startup_seconds = 0.0
    return run


def footer_reader(spark):
    """``read_remotely`` for planner.plan: parquet footers read in Spark tasks, FOOTERS_PER_SPARK_TASK each."""

    def read(input_url: str, storage_options: dict, items: list) -> list[dict]:
        from clip_nsfw_spark.driver.planner import FOOTERS_PER_SPARK_TASK

        parts = [items[i:i + FOOTERS_PER_SPARK_TASK] for i in range(0, len(items), FOOTERS_PER_SPARK_TASK)]

        def process_partition(parts_here):
            from clip_nsfw_spark.driver.planner import read_footers_here
            from clip_nsfw_spark.executor.stages import mark_process_seconds

            for part in parts_here:
                found = read_footers_here(input_url, storage_options, part)
                mark_process_seconds()  # the worker's CPU so far is the planning's, not the tasks'
                yield json.dumps({"first": part[0][0], "result": found}).encode()

        by_first = {record["first"]: record["result"]
                    for record in map(json.loads, map_parts(spark, parts, process_partition))}
        return [result for part in parts for result in by_first[part[0][0]]]

    return read


# What a Spark partition of job tasks sends back (on Spark Connect, as this Arrow column): one pickled record,
# contract.sum_of_tasks plus ``errors``,
# each task's exception as a typed value (the exception itself, pickled apart, with its class name and
# message beside it): the driver raises the same class, never a class looked up by its name, and a class
# it cannot load (a module only executors have) still comes back as a TaskError with its name and message.
PARTITION_RESULT = "result binary"


def map_parts(spark, parts: list, process) -> list[bytes]:
    """``process`` (an iterator of parts → an iterator of bytes) run on Spark with one part per Spark
    partition; every partition's bytes, collected.

    The parts travel as data, not in the closure: PySpark unpickles a task's closure for every task, so a task
    list inside it would cost every task the whole list (seconds each at 1M tasks). On classic Spark, an RDD
    of one part per slice (``parallelize``: partition i holds part i and nothing else); on Spark Connect,
    which has no RDDs, or where the SparkContext is out of reach, ``task_frame``'s DataFrame through
    ``mapInArrow``. The RDD's way cost a fresh session ~1.8 s less before its first Python job and ~2.5 s
    less of the JVM's CPU (no SQL plan, broadcast join or generated code: ``python bench/plumbing.py``,
    docs/performance.md).
    """
    context = _spark_context(spark)
    if context is not None:
        try:  # no task runs yet: a refusal here (py4j allow-listing on shared clusters) takes the other way
            rdd = context.parallelize(parts, len(parts)).mapPartitions(process)
        except Exception as err:  # noqa: BLE001 - py4j's security and protocol errors have no common base
            log.info("the SparkContext refused an RDD (%s): the tasks go as a DataFrame",
                     " ".join(str(err).split())[:200])
        else:
            return _collect(spark, rdd)

    def arrow(batches):
        import pyarrow as pa

        for data in process(parts_in(batches)):
            yield pa.RecordBatch.from_pydict({"result": [data]}, schema=pa.schema([("result", pa.binary())]))

    return [row.result for row in _collect(spark, task_frame(spark, parts).mapInArrow(arrow, PARTITION_RESULT))]


def partition_runner(worker, phase_started: float | None = None):
    """The function each Spark partition runs (``map_parts``) over its part(s) of tasks: the tasks one after
    the other, each retried in place on a ``TaskError``; one record back per part (``PARTITION_RESULT``).
    ``phase_started``: when the task phase began (epoch seconds), for stages.process_seconds_once."""

    def process_partition(parts):
        import time

        from pyspark import cloudpickle

        from clip_nsfw_spark.contract import add_figures, sum_of_tasks
        from clip_nsfw_spark.errors import ClipNsfwError, TaskError
        from clip_nsfw_spark.executor.stages import StageClock, process_seconds_once

        before = process_seconds_once(phase_started)  # this process's start and imports, by its first Spark task
        clock = StageClock()
        parts = iter(parts)
        while True:
            with clock("transfer"):  # the Spark task's job tasks, as received
                part = next(parts, None)
            if part is None:
                return
            completed, errors = [], []
            for task in part:
                for attempt in range(1, TASK_ATTEMPTS + 1):
                    try:
                        completed.append(worker(task))
                        break
                    except TaskError as err:
                        if attempt == TASK_ATTEMPTS:
                            errors.append(_as_value(err))
                        else:
                            time.sleep(attempt)
                    except ClipNsfwError as err:
                        errors.append(_as_value(err))
                        break
            with clock("commit"):
                if hasattr(worker, "record_together"):  # one batch state: a resume reads it, not one per task
                    worker.record_together(completed)
            with clock("transfer"):
                record = sum_of_tasks(completed) | {"errors": errors}
                wall, cpu = clock.figures()
                stages = {"stage_seconds": before | wall, "stage_cpu_seconds": before | cpu}
                record["figures"] = add_figures(record["figures"], stages)
                before, clock = {}, StageClock()
            yield cloudpickle.dumps(record)

    return process_partition


def task_frame(spark, parts: list[list], run: int | None = None):
    """A DataFrame of one row per Spark partition: partition i holds part i's tasks (zlib-compressed pickle).

    ``run`` < len(parts) makes a frame of only the first ``run`` partitions over the same broadcast table of
    every part (the benchmark's per-task cost with a million tasks, without running them all)."""
    import zlib

    import pandas as pd
    from pyspark.sql import functions as F

    table = pd.DataFrame({"part": range(len(parts)),
                          "tasks": [zlib.compress(pickle.dumps(part), 1) for part in parts]})
    listed = spark.createDataFrame(table, "part long, tasks binary")
    count = len(parts) if run is None else run
    return (spark.range(0, count, 1, numPartitions=count)
            .join(F.broadcast(listed), F.col("id") == F.col("part"))
            .select("tasks"))


def parts_in(batches):
    """The parts ``task_frame`` encoded, as a ``mapInArrow`` function receives them (one per row)."""
    import zlib

    for batch in batches:
        for data in batch.column(0).to_pylist():
            yield pickle.loads(zlib.decompress(data))


def _collect(spark, frame) -> list:
    """``frame.collect()``, cancelled by Ctrl-C/SIGTERM; a failed Spark job as one TaskError line."""
    try:
        with _cancel_on_interrupt(spark):
            return frame.collect()
    except Exception as err:  # noqa: BLE001 - Py4J, PySpark and Connect raise different types
        raise _spark_failure(err) from None


def _as_value(err: Exception) -> dict:
    """``err`` as a value to send back: its class and message, not its traceback or cause (they may not
    pickle, and the message already names the task's file and the cause in one line). A class that cannot
    be made again from its message comes back as a TaskError carrying its name and message."""
    from pyspark import cloudpickle

    from clip_nsfw_spark.errors import TaskError

    text = str(err)
    try:
        data = cloudpickle.dumps(type(err)(text))
    except Exception:  # noqa: BLE001 - any class whose instances do not survive the trip
        data = cloudpickle.dumps(TaskError(f"{type(err).__name__}: {text}"))
    return {"exception": data, "class": type(err).__name__, "message": text}


def _error_from(sent: dict) -> Exception:
    """The exception ``_as_value`` sent, loaded on the driver; a TaskError naming it if it cannot be loaded."""
    from clip_nsfw_spark.errors import TaskError

    try:
        error = pickle.loads(sent["exception"])
    except Exception:  # noqa: BLE001 - e.g. a class from a module only executors have
        return TaskError(f"{sent['class']}: {sent['message']}")
    return error if isinstance(error, Exception) else TaskError(f"{sent['class']}: {sent['message']}")


def _spark_failure(err: Exception):
    """One line for a Spark job that failed outside our tasks' control (a worker killed too often …)."""
    from clip_nsfw_spark.errors import TaskError

    text = str(err)
    if _jvm_gone(err):  # the JVM was killed (the OOM killer, kill -9) or died: py4j lost its connection
        silence_py4j_logs()  # every later call to it would log another traceback
        return TaskError(f"the Spark job failed: Spark's JVM stopped answering ({type(err).__name__}): it was "
                         "killed or died (out of memory? see the Spark log, and the kernel log for the OOM "
                         "killer). The output is incomplete: rerun with --resume.")
    last = next((line.strip() for line in text.splitlines() if "Error" in line or "Exception" in line),
                type(err).__name__)
    return TaskError(f"the Spark job failed: {last[:500].rstrip('.')}. The output is incomplete: rerun with --resume.")


def _jvm_gone(err: BaseException) -> bool:
    """True when py4j lost the JVM (its network errors, or the connection refused by a JVM that is gone)."""
    for error in (err, err.__cause__, err.__context__):
        if error is None:
            continue
        kind = type(error)
        if kind.__name__ == "Py4JNetworkError" or isinstance(error, (ConnectionRefusedError, ConnectionResetError)) \
                or "Answer from Java side is empty" in str(error):
            return True
    return False


class _DropPy4jRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}py4j{os.sep}" not in record.pathname


def silence_py4j_logs() -> None:
    """Drop py4j's log records from now on. Called when the job is being stopped (SIGTERM reaches the JVM
    too): every later call to the dying JVM would log a traceback that says nothing the user needs."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropPy4jRecords) for f in handler.filters):
            handler.addFilter(_DropPy4jRecords())


@contextlib.contextmanager
def _cancel_on_interrupt(spark):
    """While the driver waits for Spark jobs, Ctrl-C (SIGINT) or SIGTERM cancels them and raises
    KeyboardInterrupt (``errors.Terminated`` for SIGTERM).

    PySpark's own handler calls the JVM from inside the signal handler; when the signal lands while the main
    thread is reading a py4j answer (as it is in ``collect``), that nested call fails and py4j logs several
    tracebacks. Here the handler only starts a thread that cancels the jobs; ``collect`` then fails with a
    cancellation, which becomes one KeyboardInterrupt. A second Ctrl-C raises at once.
    """
    import signal
    import threading

    from clip_nsfw_spark.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted: list[int] = []  # the signal received, if any

    def cancel():
        try:
            spark.sparkContext.cancelAllJobs()
        except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
            with contextlib.suppress(Exception):
                spark.interruptAll()

    def stop(signum: int):
        return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def on_signal(signum, frame):
        if signum == signal.SIGTERM:
            silence_py4j_logs()
        if interrupted:
            raise stop(signum)
        interrupted.append(signum)
        threading.Thread(target=cancel, name="clip-nsfw-cancel", daemon=True).start()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception:
        if interrupted:
            raise stop(interrupted[0]) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
