"""Sustained load: score ≥ 10M rows with the CLI on local Spark; report peak memory and check every row.

    python bench/load.py [--rows 10000000] [--files 20] [--cores 2] [--workdir bench/data]

Runs ``clip-nsfw-spark run`` as a child process and samples /proc every 0.5 s for the peak resident
memory of the driver (Python), the JVM and the Spark Python workers. At the end it counts the rows of
every output file from the parquet footers and compares them with the input: the count must be exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark.tools.sample import write_parquet_sample  # noqa: E402


def process_tree(root_pid: int) -> dict[int, tuple[str, int, int]]:
    """{pid: (command line, rss bytes, parent pid)} of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            rss_pages = int(Path(f"/proc/{entry}/statm").read_text().split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
        info[int(entry)] = (cmd, rss_pages * os.sysconf("SC_PAGE_SIZE"), parent)
    tree, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in info:
            tree[pid] = info[pid]
        stack.extend(children.get(pid, []))
    return tree


def role(pid: int, root: int, tree: dict) -> str:
    cmd, _, parent = tree[pid]
    if pid == root:
        return "driver (python)"
    if "java" in cmd.split(" ")[0]:
        return "jvm"
    parent_cmd = tree.get(parent, ("", 0, 0))[0]
    if "java" in parent_cmd.split(" ")[0]:
        return "python worker daemon"  # started by the JVM; the workers are forked from it
    return "python workers"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    source, output = workdir / f"load-{args.rows}", workdir / f"load-{args.rows}-out"
    if not (source / "_DONE").exists():
        shutil.rmtree(source, ignore_errors=True)
        print(f"generating {args.rows:,} rows in {args.files} files under {source}")
        write_parquet_sample(str(source), rows=args.rows, files=args.files, row_group_rows=65536)
        (source / "_DONE").write_text("")
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable))
    command = [sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", str(source), "--output", str(output),
               "--master", f"local[{args.cores}]"]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=ROOT)
    peaks: dict[str, int] = {}
    while child.poll() is None:
        totals: dict[str, int] = {}
        tree = process_tree(child.pid)
        for pid, (cmd, rss, _) in tree.items():
            name = role(pid, child.pid, tree)
            if name == "python workers":  # per worker, not summed: the budget is per Python worker
                peaks[name] = max(peaks.get(name, 0), rss)
            else:
                totals[name] = totals.get(name, 0) + rss
        for name, rss in totals.items():
            peaks[name] = max(peaks.get(name, 0), rss)
        time.sleep(0.5)
    elapsed = time.perf_counter() - started
    if child.returncode != 0:
        print(f"the job failed with status {child.returncode}")
        return 1
    written = sum(pq.read_metadata(p).num_rows for p in output.rglob("*.parquet") if "_clip_nsfw" not in str(p))
    expected = sum(pq.read_metadata(p).num_rows for p in source.glob("*.parquet"))
    report = json.loads((output / "_clip_nsfw_report.json").read_text())
    result = {
        "date": time.strftime("%Y-%m-%d"), "rows_input": expected, "rows_written": written,
        "rows_reported": report["rows"]["read"], "exact": written == expected == report["rows"]["read"] == args.rows,
        "seconds_wall": round(elapsed, 1), "rows_per_second_wall": round(args.rows / elapsed),
        "worker_peak_rss_mb_from_tasks": report.get("worker_max_rss_mb"),
        "peak_rss_mb": {k: round(v / 2**20) for k, v in peaks.items()}, "cores": args.cores,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
