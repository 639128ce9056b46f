"""S3 requests per task of a run, a resume with nothing to do, and an overwrite, through the local S3
server (tests/s3server.py) and a counting proxy: the price of each safety step in requests.

    python bench/s3_requests.py [--tasks 60]

Prints one JSON line: the commit, and per phase the requests, requests per task and seconds. The job
runs in this process (the local runner), one 50-row parquet file per task.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import LatencyProxy, SeaweedS3  # noqa: E402

from clip_nsfw_spark.driver.config import JobConfig  # noqa: E402
from clip_nsfw_spark.driver.job import run_job  # noqa: E402
from clip_nsfw_spark.tools.sample import write_parquet_sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    tasks = parser.parse_args().tasks
    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="s3-requests-")))
    server.start()
    try:
        server.filesystem().mkdir("requests")
        write_parquet_sample("s3://requests/in", rows=tasks * 50, files=tasks, storage_options=server.storage_options())
        proxy = LatencyProxy(server.port, delay=0.0)
        options = dict(server.storage_options(), endpoint_url=proxy.endpoint)
        phases = {}
        for name, flags in (("run", {}), ("resume", {"resume": True}), ("overwrite", {"overwrite": True})):
            before, started = proxy.requests, time.time()
            run_job(JobConfig(input="s3://requests/in", output="s3://requests/out", storage_options=options, **flags))
            phases[name] = {"requests": proxy.requests - before,
                            "per_task": round((proxy.requests - before) / tasks, 2),
                            "seconds": round(time.time() - started, 1)}
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True).stdout.strip()
        print(json.dumps({"commit": commit, "tasks": tasks, **phases}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
