"""The job S3 → S3 with and without read-ahead/write-behind threads (``--overlap on|off``), S3's latency added.

    python bench/overlap_s3.py [--source bench/data/pyarrow-f16-500000-4] [--latency 0.02] [--repeats 2]

Starts the tests' SeaweedFS server on 127.0.0.1 and the latency proxy of bench/scale.py (every request held
``--latency`` seconds, in a process of its own), uploads ``--source``'s parquet files (as pyarrow's writer
made them: bench/default_writers.py), then runs ``clip-nsfw-spark run --master local[2]`` S3 → S3
(annotate) alternately with ``--overlap off`` and ``--overlap on``, ``--repeats`` times each, a fresh output
each time. Printed per run: the task phase's seconds and rows/s (the report's ``durations_seconds.run``), and
its core-seconds by stage (``task_phase_core_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from scale import ProxyProcess, SeaweedS3, cpu_name, run_cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT / "bench" / "data" / "pyarrow-f16-500000-4"))
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    files = sorted(Path(args.source).glob("*.parquet"))
    if not files:
        parser.error(f"no parquet files in {args.source}: make them with bench/default_writers.py")
    results = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_name(), "source": args.source,
               "latency_s": args.latency, "master": args.master, "runs": []}
    with tempfile.TemporaryDirectory(prefix="overlap-") as work:
        server = SeaweedS3(Path(work))
        server.start()
        proxy = ProxyProcess(server.port, args.latency)
        try:
            fs = server.filesystem()
            fs.mkdir("bench")
            for path in files:
                fs.put_file(str(path), f"bench/in/{path.name}")
            env = dict(os.environ, **dict(server.env(), AWS_ENDPOINT_URL=proxy.endpoint))
            for repeat in range(args.repeats):
                for overlap in ("off", "on"):
                    output = f"s3://bench/out-{overlap}-{repeat}"
                    status, stderr, _ = run_cli(["--input", "s3://bench/in", "--output", output, "--master",
                                                 args.master, "--overlap", overlap], env)
                    if status != 0:
                        print(stderr[-3000:], file=sys.stderr)
                        return status
                    report = json.loads(fs.cat_file(f"bench/out-{overlap}-{repeat}/_clip_nsfw_report.json"))
                    run = {"overlap": overlap, "run_seconds": report["durations_seconds"]["run"],
                           "rows": report["rows"]["read"], "core_seconds": report["task_phase_core_seconds"]}
                    run["rows_per_second"] = run["rows"] / run["run_seconds"]
                    results["runs"].append(run)
                    stages = " ".join(f"{k} {v:.2f}" for k, v in run["core_seconds"]["by_stage"].items())
                    print(f"overlap {overlap:3s}: task phase {run['run_seconds']:6.2f} s, "
                          f"{run['rows_per_second']:9,.0f} rows/s; core-seconds: {stages}", flush=True)
        finally:
            proxy.close()
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
