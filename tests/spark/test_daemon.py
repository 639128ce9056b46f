"""The preloading worker daemon (clip_nsfw_spark/spark/daemon.py): real PySpark daemons started as Spark starts
them (``python -m <module>``, the port read from stdout), its three ways back to PySpark's plain daemon forced
deterministically (a ``sitecustomize`` on PYTHONPATH), real Spark workers forked from it, and the once-only
account of its preload in forked processes."""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import textwrap

import pytest

from clip_nsfw_spark.spark.runner import PRELOADING_DAEMON, _daemon_module_set_elsewhere, _imports_this_package

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PySpark's daemon forks (Linux here)")

QUIET_BLAS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # as Spark runs its workers (task.cpus 1)


def start_daemon(module: str, sitecustomize: str | None = None, tmp_path=None):
    """``python -m module`` as Spark's PythonWorkerFactory starts it: (process, the port it wrote on stdout).
    ``sitecustomize``: code every interpreter it runs imports first (PYTHONPATH)."""
    env = os.environ | QUIET_BLAS
    if sitecustomize is not None:
        (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    ready, _, _ = select.select([process.stdout], [], [], 120)
    if not ready:
        process.kill()
        pytest.fail(f"{module} wrote no port in 120 s: {stop_daemon(process)}")
    port = struct.unpack(">i", process.stdout.read(4))[0]
    return process, port


def stop_daemon(process) -> str:
    """Close its stdin (PySpark's daemon then shuts down), return its stderr."""
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.stderr.read().decode()


def command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_the_daemon_preloads_and_then_serves_as_pysparks_own():
    process, port = start_daemon(PRELOADING_DAEMON)
    try:
        assert 0 < port < 65536  # the first bytes on stdout are the port: the preload wrote nothing there
        assert PRELOADING_DAEMON in command_line(process.pid)  # still this module: the preload was kept
    finally:
        err = stop_daemon(process)
    assert "plain worker daemon" not in err, err


# a thread that holds nothing, started where the daemon must not fork with it
SLEEPER = "import threading, time\nthreading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n"


@pytest.mark.parametrize("sitecustomize,why", [
    (SLEEPER, "threads at the start"),
    # the preload imports the parquet decoder's stream module: a finder that starts a thread right then
    ("""
     import sys
     class StartsAThread:
         def find_spec(self, name, path=None, target=None):
             if name == "clip_nsfw_spark.parquet.stream":
                 exec(%r)
             return None
     sys.meta_path.insert(0, StartsAThread())
     """ % SLEEPER, "threads after the preload"),
    # a module only the preload imports (not -m's imports, not PySpark's daemon: Spark 3.5's imports its worker)
    ("import sys\nsys.modules['clip_nsfw_spark.parquet.stream'] = None\n", "the preload failed (ModuleNotFoundError"),
], ids=["thread-at-start", "thread-after-preload", "preload-fails"])
def test_an_unsafe_or_failed_preload_becomes_pysparks_plain_daemon(tmp_path, sitecustomize, why):
    process, port = start_daemon(PRELOADING_DAEMON, sitecustomize, tmp_path)
    try:
        assert 0 < port < 65536
        line = command_line(process.pid)
        assert "pyspark.daemon" in line and PRELOADING_DAEMON not in line  # the same process, exec'd
    finally:
        err = stop_daemon(process)
    assert "PySpark's plain worker daemon runs instead of the preloading one" in err and why in err, err


def run_forks(code: str) -> list:
    """``code`` run in a fresh interpreter that defines ``forked(fn)``: fn's JSON answer in each of 3 forks."""
    script = textwrap.dedent("""
        import json, os
        def forked(fn):
            answers = []
            for _ in range(3):
                read, write = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(read)
                    os.write(write, json.dumps(fn()).encode())
                    os._exit(0)
                os.close(write)
                with os.fdopen(read) as f:
                    answers.append(json.loads(f.read()))
                os.waitpid(pid, 0)
            return answers
    """) + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ | QUIET_BLAS)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_preload_seconds_are_counted_once_and_only_in_the_phase_they_were_spent_in():
    # a daemon that offered its seconds, then forks three "workers": exactly one counts them as imports, each
    # its own CPU before its first task as its start; a phase that began after the preload counts none
    answers = run_forks("""
        import time
        from clip_nsfw_spark.executor import stages
        from clip_nsfw_spark.spark.daemon import _seconds_pipe
        stages.offer_preload_seconds(_seconds_pipe(1000.0, time.time()), os.getpid())
        during = forked(lambda: stages.process_seconds_once(phase_started=time.time() - 60))
        stages.offer_preload_seconds(_seconds_pipe(1000.0, time.time() - 60), os.getpid())
        after = forked(lambda: stages.process_seconds_once(phase_started=time.time()))
        print(json.dumps([during, after, stages.process_seconds_once()]))
    """)
    during, after, in_the_daemon = answers
    assert sorted(a["imports"] for a in during) == [0.0, 0.0, 1000.0]
    assert all(a["worker_start"] >= 0 for a in during)
    assert [a["imports"] for a in after] == [0.0, 0.0, 0.0]
    assert "worker_start" in in_the_daemon and in_the_daemon.get("imports", 0) < 1000.0  # its own, not the pipe's


def test_forked_workers_draw_different_numpy_random_numbers():
    # numpy's global state is copied by a fork; the daemon reseeds it in each child, as a fresh import would
    same, reseeded = run_forks("""
        import numpy as np
        from clip_nsfw_spark.spark.daemon import prepare_forks
        np.random.seed(1)
        same = forked(lambda: float(np.random.random()))
        prepare_forks()
        print(json.dumps([same, forked(lambda: float(np.random.random()))]))
    """)
    assert len(set(same)) == 1  # what an unprepared fork gives: the test can tell
    assert len(set(reseeded)) == 3


def test_the_workers_must_import_this_very_package(monkeypatch, tmp_path):
    assert _imports_this_package(sys.executable)  # the test interpreter imports the package the tests import
    assert not _imports_this_package(str(tmp_path / "no-such-python"))
    other = tmp_path / "elsewhere" / "clip_nsfw_spark"  # another copy first on the path (an older release)
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other.parent))
    monkeypatch.chdir(tmp_path)  # (the current folder comes first on a started interpreter's path)
    assert not _imports_this_package(sys.executable)


# A local session started as the CLI starts one, asked which daemon its workers were forked from.
SESSION_PROBE = """
import json, os, sys
from clip_nsfw_spark.spark.runner import spark_session

def inspect(_):
    import os as worker_os
    with open(f"/proc/{worker_os.getppid()}/cmdline", "rb") as f:
        parent = f.read().replace(b"\\0", b" ").decode()
    from clip_nsfw_spark.executor import stages
    yield parent, stages._preloaded is not None

with spark_session("local[2]") as spark:
    setting = spark.sparkContext.getConf().get("spark.python.daemon.module", None)
    workers = spark.sparkContext.parallelize(range(2), 2).mapPartitions(inspect).collect()
print(json.dumps({"setting": setting, "workers": workers}))
"""


@pytest.mark.parametrize("preload", ["1", ""], ids=["CLIP_NSFW_PRELOAD=1", "default"])
def test_local_sessions_fork_workers_from_the_preloading_daemon_only_when_asked(tmp_path, preload):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_GATEWAY", "SPARK_REMOTE"))}
    env |= {"CLIP_NSFW_PRELOAD": preload, "PYSPARK_PYTHON": sys.executable} | QUIET_BLAS
    done = subprocess.run([sys.executable, "-c", SESSION_PROBE], capture_output=True, text=True, timeout=600,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answer["workers"]) == 2
    if preload:
        assert answer["setting"] == PRELOADING_DAEMON
        for parent, preloaded in answer["workers"]:
            assert PRELOADING_DAEMON in parent and preloaded
    else:
        assert answer["setting"] is None
        for parent, preloaded in answer["workers"]:
            assert "pyspark.daemon" in parent and not preloaded


def test_a_daemon_module_set_in_sparks_own_settings_is_kept(monkeypatch, tmp_path):
    # the builder's setting would override spark-defaults.conf and PYSPARK_SUBMIT_ARGS: seen there, none is made
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    assert not _daemon_module_set_elsewhere()  # no file
    (tmp_path / "spark-defaults.conf").write_text("# spark.python.daemon.module  mine\nspark.task.cpus 1\n")
    assert not _daemon_module_set_elsewhere()  # commented out
    for line in ("spark.python.daemon.module   my.daemon", "spark.python.daemon.module=my.daemon",
                 "  spark.python.daemon.module: my.daemon"):  # Java properties' three spellings
        (tmp_path / "spark-defaults.conf").write_text(line + "\n")
        assert _daemon_module_set_elsewhere(), line
    home = tmp_path / "home"
    (home / "conf").mkdir(parents=True)
    (home / "conf" / "spark-defaults.conf").write_text("spark.python.daemon.module my.daemon\n")
    monkeypatch.delenv("SPARK_CONF_DIR")
    monkeypatch.setenv("SPARK_HOME", str(home))
    assert _daemon_module_set_elsewhere()
    # without SPARK_HOME, where PySpark looks (its package's folder), not a conf/ folder that happens to be here
    monkeypatch.delenv("SPARK_HOME")
    monkeypatch.chdir(home)
    assert not _daemon_module_set_elsewhere()
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--conf spark.python.daemon.module=my.daemon pyspark-shell")
    assert _daemon_module_set_elsewhere()
