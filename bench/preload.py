"""The preloading worker daemon (spark/daemon.py) against PySpark's plain one, in alternated pairs.

    python bench/preload.py --source /work/benchdata/pyarrow-f16-1000000-4 --pairs 3 --json bench/results/preload.json

Each run is bench.py's ``annotate-pyarrow-f16`` case as a whole command (a fresh local[--cores] session, the
job, its report), with ``CLIP_NSFW_PRELOAD=1`` or without; the pairs alternate which goes first. Printed per
run: the task phase's wall seconds, its core-seconds by the stages the daemon changes (worker start, imports,
model, open, idle) and rows per core-second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import _cpu_model, versions  # bench/ is on sys.path: this script's folder

BENCH = Path(__file__).resolve().parent / "bench.py"
SHOWN = ("worker_start", "imports", "model", "open", "decode", "score", "idle")


def run(source: Path, preload: bool, cores: int, workdir: Path) -> dict:
    """One whole command; the job's report figures."""
    result = workdir / "preload-result.json"
    result.unlink(missing_ok=True)
    env = os.environ | {"CLIP_NSFW_PRELOAD": "1" if preload else ""}
    command = [sys.executable, str(BENCH), "--case", "annotate-pyarrow-f16", "--input", str(source),
               "--output", str(workdir / "preload-out"), "--result", str(result), "--cores", str(cores)]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:])
    report = json.loads(result.read_text())
    account = report["task_phase_core_seconds"]
    return {"preload": preload, "run_seconds": report["durations_seconds"]["run"],
            "core_seconds": account["core_seconds"], "rows_per_core_second": account["rows_per_core_second"],
            "by_stage": account["by_stage"], "worker_max_rss_mb": report["worker_max_rss_mb"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a folder of float16 parquet files")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clip-nsfw-preload-bench"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for pair in range(args.pairs):
        for preload in ((True, False) if pair % 2 == 0 else (False, True)):
            figures = run(args.source, preload, args.cores, args.workdir)
            runs.append(figures)
            stages = " ".join(f"{k} {figures['by_stage'].get(k, 0):.2f}" for k in SHOWN)
            print(f"preload {'on ' if preload else 'off'}  run {figures['run_seconds']:6.2f} s  "
                  f"{figures['rows_per_core_second']:8,.0f} rows/core-s  RSS {figures['worker_max_rss_mb']:6.1f} MB"
                  f"  {stages}", flush=True)
    for preload in (True, False):
        mine = [r for r in runs if r["preload"] == preload]
        print(f"preload {'on ' if preload else 'off'} mean: run {sum(r['run_seconds'] for r in mine) / len(mine):.2f} s, "
              f"{sum(r['core_seconds'] - r['by_stage']['idle'] for r in mine) / len(mine):.2f} busy core-seconds")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "cpu": _cpu_model(), "versions": versions(),
                                         "cores": args.cores, "source": str(args.source), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
