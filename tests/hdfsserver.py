"""A real HDFS on loopback for tests: a NameNode and a DataNode (Hadoop's MiniDFSCluster), WebHDFS on.

The jars come from Maven Central (tests/hdfs/pom.xml, resolved by .ci/run into .cache/hdfs-jars, or the
folder named by CLIP_NSFW_HDFS_JARS); Java runs them. Every address binds 127.0.0.1. Python reaches it
through WebHDFS (fsspec ``webhdfs://127.0.0.1:<http port>``), Spark's JVM through ``hdfs://127.0.0.1:<rpc
port>``. The NameNode's log is kept in the work folder (its path is in every startup error).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUPERUSER = "clip-nsfw-admin"  # HADOOP_USER_NAME of the NameNode's process: HDFS's superuser


def jars_folder() -> Path:
    return Path(os.environ.get("CLIP_NSFW_HDFS_JARS", ROOT / ".cache" / "hdfs-jars"))


def missing() -> str | None:
    """Why an HDFS cannot be started here (None: it can)."""
    if shutil.which("java") is None:
        return "no java on PATH"
    folder = jars_folder()
    if not any(folder.glob("hadoop-client-minicluster-*.jar")):
        return (f"no Hadoop jars in {folder}: run mvn -q -B -f tests/hdfs/pom.xml dependency:copy-dependencies "
                f"-DoutputDirectory={folder}")
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (held together while chosen, so never the same one twice)."""
    probes = [socket.socket() for _ in range(n)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class MiniHDFS:
    """``start()`` / ``stop()``; ``rpc_port`` (hdfs://), ``http_port`` (WebHDFS), ``filesystem(user)``."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process = None
        self.rpc_port = self.http_port = None

    @property
    def hdfs_url(self) -> str:
        return f"hdfs://127.0.0.1:{self.rpc_port}"

    @property
    def webhdfs_url(self) -> str:
        return f"webhdfs://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 120.0) -> None:
        self.rpc_port, self.http_port = _free_ports(2)
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        details = self.workdir / "details.json"
        details.unlink(missing_ok=True)
        settings = {"dfs.namenode.rpc-bind-host": "127.0.0.1", "dfs.namenode.servicerpc-bind-host": "127.0.0.1",
                    "dfs.namenode.http-bind-host": "127.0.0.1", "dfs.namenode.https-bind-host": "127.0.0.1",
                    "dfs.namenode.http-address": f"127.0.0.1:{self.http_port}",
                    "dfs.datanode.address": "127.0.0.1:0", "dfs.datanode.http.address": "127.0.0.1:0",
                    "dfs.datanode.ipc.address": "127.0.0.1:0", "dfs.webhdfs.enabled": "true",
                    "dfs.permissions.enabled": "true", "dfs.replication": "1"}
        args = ["java", "-Xmx768m", f"-Dtest.build.data={data}", "-cp", f"{jars_folder()}/*",
                "org.apache.hadoop.test.MiniDFSClusterManager", "-format", "-nnport", str(self.rpc_port),
                "-httpport", str(self.http_port), "-writeDetails", str(details)]
        for key, value in settings.items():
            args += ["-D", f"{key}={value}"]
        self.log_path = self.workdir / "namenode.log"
        self.log = open(self.log_path, "ab")
        # the user that starts the NameNode is HDFS's superuser: named, not guessed from $USER
        env = dict(os.environ, HADOOP_USER_NAME=SUPERUSER)
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the HDFS minicluster exited ({self.log_path}):\n{self.log_path.read_text()[-3000:]}")
            if details.exists() and details.stat().st_size and self._answers():
                json.loads(details.read_text())
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"HDFS did not start within {timeout:.0f} s ({self.log_path}):\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def _answers(self) -> bool:
        """WebHDFS lists the root and a DataNode is up (a write needs one)."""
        try:
            url = f"http://127.0.0.1:{self.http_port}/jmx?qry=Hadoop:service=NameNode,name=FSNamesystemState"
            with urllib.request.urlopen(url, timeout=2) as reply:
                beans = json.loads(reply.read())["beans"]
            return bool(beans) and beans[0].get("NumLiveDataNodes", 0) >= 1
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def storage_options(self, user: str = SUPERUSER) -> dict:
        return {"user": user}

    def filesystem(self, user: str = SUPERUSER):
        import fsspec

        return fsspec.filesystem("webhdfs", host="127.0.0.1", port=self.http_port, user=user,
                                 skip_instance_cache=True)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()
