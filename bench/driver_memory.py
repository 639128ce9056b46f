"""The driver's peak memory with a large plan: a real run of N planned tasks, stopped after its first tasks.

The input is ``--files`` parquet files of ``--tasks / --files`` one-row row groups (768-d float16, on local
disk), so that ``--rows-per-task 1`` plans one task per row group: 1,000 files make 1,000,000 tasks. The
job is the command line (``clip-nsfw-spark run``) on ``--master``; it plans, packs and ships every task,
starts its progress watcher and runs Spark tasks until ``--seconds`` after its first progress line, then
gets Ctrl-C (the run stops as a user's would: the lease released, exit 130). What is printed: the plan's
task count, the seconds to the first progress line, tasks done, the driver's peak RSS (its Python process:
Linux's VmHWM, read on its way out) and the JVM's (VmHWM read just before the Ctrl-C).

    python bench/driver_memory.py --tasks 1000000 --files 1000 --json bench/results/driver_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench import _cpu_model as cpu_name  # noqa: E402
from scale import _RSS_LAUNCHER, PEAK_RSS  # noqa: E402


def write_input(folder: Path, files: int, groups: int, dim: int = 768) -> None:
    """``files`` parquet files of ``groups`` one-row row groups of a ``dim``-wide float16 embedding."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        values = rng.standard_normal((groups, dim)).astype(np.float16)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim).cast(pa.list_(pa.float16()))
        table = pa.table({"key": pa.array([f"{i:05d}{j:05d}" for j in range(groups)]), "embedding": embedding})
        pq.write_table(table, folder / f"part-{i:05d}.parquet", row_group_size=1)


def vm_hwm_mb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def java_children(pid: int) -> list[int]:
    """The java processes below ``pid`` (the driver's JVM, started by PySpark's spark-submit)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            stack.append(child)
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "java":
                    found.append(child)
            except OSError:
                pass
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=60, help="run this long after the first progress line")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--timeout", type=float, default=3600, help="give up (Ctrl-C) this long after the start")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    groups = args.tasks // args.files
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "files": args.files, "row_groups_per_file": groups, "master": args.master}
    with tempfile.TemporaryDirectory(prefix="driver-memory-") as work:
        started = time.perf_counter()
        write_input(Path(work) / "in", args.files, groups)
        results["input_seconds"] = round(time.perf_counter() - started, 1)
        command = [sys.executable, "-c", _RSS_LAUNCHER, "run", "--input", f"{work}/in", "--output", f"{work}/out",
                   "--rows-per-task", "1", "--master", args.master, "--drop-columns", "embedding"]
        log = open(Path(work) / "driver.log", "w+")
        started = time.perf_counter()
        driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        first_progress, jvm_peak = None, None
        while driver.poll() is None:
            time.sleep(1)
            log.seek(0)
            text = log.read()
            if first_progress is None and re.search(r"progress \[", text):
                first_progress = time.perf_counter() - started
            jvm = [vm_hwm_mb(pid) for pid in java_children(driver.pid)]
            jvm_peak = max([m for m in jvm if m] + [jvm_peak or 0]) or None
            elapsed = time.perf_counter() - started
            if (first_progress is not None and elapsed > first_progress + args.seconds) or elapsed > args.timeout:
                driver.send_signal(signal.SIGINT)
                break
        try:
            driver.wait(600)
        except subprocess.TimeoutExpired:  # never leave the driver (and its JVM) behind
            driver.kill()
            driver.wait()
        log.seek(0)
        text = log.read()
        log.close()
        done = re.findall(r"progress \[[#.]+\] ([\d,]+)/([\d,]+) tasks", text)
        rss = PEAK_RSS.search(text)
        results |= {"exit": driver.returncode, "seconds_to_first_progress": round(first_progress or -1, 1),
                    "tasks_planned": int(done[-1][1].replace(",", "")) if done else None,
                    "tasks_done_at_stop": int(done[-1][0].replace(",", "")) if done else None,
                    "driver_python_peak_rss_mb": int(rss.group(1)) if rss else None,
                    "driver_jvm_peak_rss_mb": jvm_peak}
        if driver.returncode not in (0, 130):
            print(text[-3000:], file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["exit"] in (0, 130) and results["driver_python_peak_rss_mb"] else 1


if __name__ == "__main__":
    sys.exit(main())
