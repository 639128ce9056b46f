"""Filesystems: one place that turns a URL (local path, file://, s3://, hdfs://, …) into an fsspec filesystem.

s3:// needs s3fs, which reads credentials from the usual AWS environment and config files
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL …); ``storage_options`` from the
job config are passed to the filesystem as they are (endpoint_url, anon, profile, client_kwargs …).
hdfs:// goes through pyarrow's HadoopFileSystem and needs libhdfs and a Hadoop client configuration on
every machine, or through WebHDFS (the ``webhdfs_port`` storage option; tests/stores/test_hdfs.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import inspect
import os
import posixpath
import re
import shutil
import time
import uuid
from typing import Any, Collection

import fsspec

from clip_nsfw_spark.storage.s3_listing import find_in_ranges, use_fast_s3_listings
from clip_nsfw_spark.storage.s3_timestamps import use_fast_s3_timestamps
from clip_nsfw_spark.errors import ClipNsfwError, ConfigError, InputError, MissingDependencyError, OutputError


def filesystem(url: str, storage_options: dict | None = None):
    """Return ``(fs, path)`` for ``url``: the path is what ``fs`` methods take (no protocol for s3)."""
    options = dict(storage_options or {})
    if url.lower().startswith("file://localhost/"):  # RFC 8089's spelling of this host: file:///path
        url = "file:///" + url[len("file://localhost/"):]
    elif url.lower().startswith("file://") and not url.startswith("file:///"):
        host = url[len("file://"):].split("/", 1)[0]
        raise ConfigError(f"cannot use {url}: a file URL names a path on this machine (file:///path or "
                          f"file://localhost/path), not on host {host!r}; mount that host's share and give its "
                          "local path, or use its own protocol (hdfs://, s3:// …)")
    if "webhdfs_port" in options and url.lower().startswith("hdfs://"):
        url = _through_webhdfs(url, options.pop("webhdfs_port"))
    if "endpoint_url" in options and url.startswith("s3"):
        options.setdefault("client_kwargs", {})
        options["client_kwargs"] = dict(options["client_kwargs"], endpoint_url=options.pop("endpoint_url"))
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        if is_webhdfs(fs):
            _time_limit_requests(fs.session)
        if type(fs).__module__.split(".")[0] == "s3fs":
            use_fast_s3_timestamps()  # a listing's keys and a GET's headers parsed ~4x faster (s3_timestamps.py)
            use_fast_s3_listings()  # a listing's pages read in half the CPU (s3_listing.py)
    except ImportError as err:
        raise MissingDependencyError(f"reading {url} needs an fsspec backend: {err}. For s3:// run "
                                     "pip install 'clip-nsfw-spark[s3]'") from err
    except ValueError as err:  # "Protocol not known: foo"
        raise ConfigError(f"cannot use {url}: {err}. Use a local path, file://, s3://, gs://, hdfs:// …") from err
    except OSError as err:  # hdfs:// without libhdfs/libjvm, an unreachable NameNode …
        hint = (" Without libhdfs, reach the same NameNode through WebHDFS: --storage-option webhdfs_port=9870 (its "
                "HTTP port; the hdfs:// URL stays as it is), or give the URL as webhdfs://host:9870/path."
                if url.lower().startswith("hdfs://") else "")
        raise InputError(f"cannot open the filesystem of {url}: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}.{hint}") from err
    return fs, path.rstrip("/") if path not in ("/",) else path


# fsspec's WebHDFS client sends its requests with no timeout: a NameNode or DataNode that accepts a connection
# and never answers (half-open after a network cut, a GC pause that never ends) would hang the driver or a task
# for good. Seconds to connect, and between two reads of an answer (not the whole answer: a large file streams).
WEBHDFS_TIMEOUT_ENV = "CLIP_NSFW_WEBHDFS_TIMEOUT"  # "connect,read" seconds; default 60,1800
WEBHDFS_TIMEOUT = (60.0, 1800.0)


def _time_limit_requests(session) -> None:
    """Give every request of a ``requests`` session a timeout unless the call names one (once per session)."""
    if getattr(session, "_clip_nsfw_timed", False):
        return
    try:
        connect, read = (float(x) for x in os.environ.get(WEBHDFS_TIMEOUT_ENV, "").split(","))
    except ValueError:
        connect, read = WEBHDFS_TIMEOUT
    request = session.request

    def timed(method, url, **kwargs):
        kwargs.setdefault("timeout", (connect, read))
        return request(method, url, **kwargs)

    session.request, session._clip_nsfw_timed = timed, True


def _through_webhdfs(url: str, port) -> str:
    """``hdfs://host[:rpc port]/path`` as ``webhdfs://host:port/path``: the same NameNode and path through its
    WebHDFS (HTTP) port, for machines without libhdfs: one URL for a laptop and a YARN cluster's nodes."""
    try:
        port = int(port)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"storage option webhdfs_port must be the NameNode's HTTP port (e.g. 9870); "
                          f"found {port!r}") from err
    rest = url[len("hdfs://"):]
    netloc, slash, path = rest.partition("/")
    host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    if not host or "[" in netloc or netloc.count(":") > 1:
        raise ConfigError(f"cannot route {url} through WebHDFS: it names no NameNode host name (hdfs://host:8020/path; "
                          "an IPv6 address: give webhdfs://[address]:9870/path instead)")
    return f"webhdfs://{host}:{port}{slash}{path}"


def canonical(url: str, storage_options: dict | None = None, glob_base: bool = False):
    """Return ``(fs, path)`` with ``path`` in the one spelling this job compares, deletes and writes by.

    Every spelling of one location gives the same ``path``: ``//``, ``.``, ``..`` and a trailing ``/`` are
    normalised; ``file://``, relative and ``~`` paths become absolute; on a local filesystem symlinks are
    resolved (``os.path.realpath``, which also resolves the existing parent of a path not created yet, as
    the kernel will when it is written); on an object store the key is ``bucket/key`` without empty or
    ``.`` parts and with ``..`` applied (never above the bucket). Comparing object-store keys this way is
    deliberately conservative: S3 itself treats ``b//in`` and ``b/in`` as different keys, but a path that
    could be the input is never used as the output. ``glob_base`` cuts a glob at its first part holding
    ``*``, ``?`` or ``[``: the folder every match lies under (``/d/in/*.parquet`` → ``/d/in``).
    """
    return canonical_in(*filesystem(url, storage_options), glob_base)


def canonical_in(fs, path: str, glob_base: bool = False):
    """``canonical`` for a filesystem already open: ``(fs, path)`` as ``filesystem`` gave them."""
    if glob_base and not _exists(fs, path):  # a path that exists is literal, even with glob characters
        path = glob_root(path)
    return fs, canonical_path(fs, path)


def canonical_path(fs, path: str) -> str:
    """``path`` of ``fs`` in its one spelling (see ``canonical``): symlinks resolved on a local disk,
    ``//``, ``.`` and ``..`` normalised on an object store."""
    if is_local(fs):
        return os.path.realpath(os.path.expanduser(path))
    if is_hierarchical(fs):  # HDFS: absolute POSIX paths, no bucket
        return posixpath.normpath("/" + re.sub("/+", "/", path).lstrip("/"))  # (normpath keeps a leading //)
    bucket, _, key = re.sub("/+", "/", path).lstrip("/").partition("/")
    key = posixpath.normpath("/" + key).lstrip("/")
    return join(bucket, key) if key else bucket


def canonical_file_name(fs, path: str) -> str:
    """A file's path as written into data (``source_file``): its folder in its one spelling
    (``canonical_path``), its own name kept. The same for every spelling of the input (``d//in/./``,
    ``file://``, a symlinked folder), and two symlinks to one stored object (DVC, git-annex) stay two
    names, as Spark's ``input_file_name()`` keeps them."""
    folder, _, name = path.rstrip("/").rpartition("/")
    return join(canonical_path(fs, folder or "/"), name)


def _exists(fs, path: str) -> bool:
    """``fs.exists`` where a storage error (denied, bad credentials) counts as "no": the callers only choose
    between a literal path and a glob, and the real access error is reported where the path is read."""
    try:
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - s3fs/botocore raise many types
        return False


def glob_root(path: str) -> str:
    """The path up to (not including) its first part holding a glob character."""
    parts = path.split("/")
    cut = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    return "/".join(parts[:cut]) or "/"


def locations(url: str, storage_options: dict | None = None, glob_base: bool = False):
    """Return ``(fs, paths)``: the canonical path and, on a local filesystem whose path ends in a symlink,
    also where that symlink itself sits (its parent resolved, its name kept). Containment checks compare
    every pair: a folder holding a symlink to the input holds the input's path, and deleting it would take
    that path away, even though the data lives elsewhere.
    """
    return locations_in(*filesystem(url, storage_options), glob_base)


def locations_in(fs, raw: str, glob_base: bool = False):
    """``locations`` for a filesystem already open: ``(fs, path)`` as ``filesystem`` gave them."""
    fs, resolved = canonical_in(fs, raw, glob_base)
    paths = [resolved]
    if is_local(fs):
        raw = os.path.expanduser(glob_root(raw) if glob_base and not _exists(fs, raw) else raw).rstrip("/")
        head, _, tail = raw.rpartition("/")
        if tail not in ("", ".", ".."):
            link = os.path.join(os.path.realpath(head or "/"), tail)
            if link != resolved:
                paths.append(link)
    return fs, paths


@dataclasses.dataclass(frozen=True)
class RunStores:
    """A run's input and output, each turned into a filesystem once (``open_run_stores``), with the
    spellings every check compares: ``in_root`` as the URL gives it (maybe a glob: what the planner lists),
    ``in_paths``/``out_paths`` as ``locations`` gives them (canonical first; the input cut at its glob)."""

    in_fs: Any
    in_root: str
    in_paths: tuple[str, ...]
    out_fs: Any
    out_paths: tuple[str, ...]

    @property
    def in_location(self) -> str:
        return location(self.in_fs, self.in_paths[0])

    @property
    def out_location(self) -> str:
        return location(self.out_fs, self.out_paths[0])


def open_run_stores(input_url: str, output_url: str, storage_options: dict | None = None) -> RunStores:
    """The driver's one ``filesystem`` call per URL of a run (see ``RunStores``)."""
    out_fs, out_raw = filesystem(output_url, storage_options)  # the output first: its errors show first
    out_paths = tuple(locations_in(out_fs, out_raw)[1])
    in_fs, in_root = filesystem(input_url, storage_options)
    return RunStores(in_fs, in_root, tuple(locations_in(in_fs, in_root, glob_base=True)[1]), out_fs, out_paths)


def location(fs, path: str) -> str:
    """A key that differs between two canonical locations unless they are the same store and path."""
    protocol = "file" if is_local(fs) else (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0])
    if is_hierarchical(fs):  # the NameNode is part of the location (and of the URL executors open)
        return f"{protocol}://{name_node(fs)}{path.rstrip('/')}"  # the root: "webhdfs://nn:9870"
    return f"{protocol}://{path.rstrip('/')}"


def name_node(fs) -> str:
    """``host:port`` of an HDFS filesystem's NameNode as its URL gave them (``host`` alone without a port)."""
    options = getattr(fs, "storage_options", {}) or {}
    host, port = (options.get("host") or "").lower(), options.get("port")  # host names ignore case
    return f"{host}:{port}" if port else host


def within(fs_a, a: str, fs_b, b: str) -> bool:
    """Whether canonical location ``a`` is ``b`` or lies under it (same store, whole path parts).

    On a local filesystem the folders are also compared by identity (device and inode): a bind mount or a
    case-insensitive filesystem (``/D/IN`` is ``/d/in`` on macOS) gives one folder two canonical paths.
    """
    inner, outer = location(fs_a, a), location(fs_b, b)
    if outer.endswith("://"):  # the root of a filesystem holds everything on it
        return inner.startswith(outer)
    if inner == outer or inner.startswith(outer + "/"):
        return True
    if is_local(fs_a) and is_local(fs_b) and os.path.exists(b):
        path = a
        while True:
            if os.path.exists(path) and os.path.samefile(path, b):
                return True
            parent = os.path.dirname(path)
            if parent == path:
                return False
            path = parent
    return False


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


HIERARCHICAL_PROTOCOLS = ("hdfs", "webhdfs", "swebhdfs", "viewfs")


def is_hierarchical(fs) -> bool:
    """Whether ``fs`` is a remote filesystem of real folders and absolute paths (HDFS, by RPC or WebHDFS),
    not an object store of ``bucket/key`` names."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & set(HIERARCHICAL_PROTOCOLS))


def is_webhdfs(fs) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"webhdfs", "swebhdfs"})


def rename_file(fs, source: str, target: str, replace: bool) -> None:
    """Rename the file ``source`` to ``target`` in one atomic step: ``replace`` puts it over an existing
    ``target`` (never a moment without one); otherwise FileExistsError when ``target`` exists (an exclusive
    create of a file written aside). Local disks and WebHDFS (HDFS's rename2: ``renameoptions=OVERWRITE`` /
    ``NONE``; fsspec's ``mv`` uses the old rename, which answers "false" and leaves both files as they were
    when the target exists). Other stores with renames: ``fs.mv``, the old target removed first."""
    if is_local(fs):
        if replace:
            fs.mv(source, target)  # rename(2): replaces the target in one step
        else:
            os.link(source, target)  # EEXIST when taken: exclusive
            os.remove(source)
        return
    if is_webhdfs(fs):
        try:
            fs._call("RENAME", method="put", path=source, destination=target,
                     renameoptions="OVERWRITE" if replace else "NONE")
        except RuntimeError as err:  # fsspec's rendering of HDFS's FileAlreadyExistsException
            if "exists" in str(err).lower():
                raise FileExistsError(f"{target} exists: {err}") from err
            raise OSError(f"cannot rename {source} to {target}: {err}") from err
        return
    if fs.exists(target):
        if not replace:
            raise FileExistsError(target)
        remove(fs, target)
    fs.mv(source, target)


def renames_atomically(fs) -> bool:
    """Whether ``fs.mv`` of a file is one atomic rename (local disks, HDFS/WebHDFS), not a copy and a
    delete (object stores: S3, GCS, Azure …)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"file", "local", "hdfs", "webhdfs", "swebhdfs", "viewfs"})


def join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


def unstrip(fs, path: str) -> str:
    """A full URL for messages: path with its protocol (s3://bucket/key), or the local path."""
    if is_hierarchical(fs):  # fsspec leaves the NameNode out (webhdfs:///path): a URL no other process opens
        return location(fs, "/") + "/" + path.strip("/") if path.strip("/") else location(fs, "/") + "/"
    return path if is_local(fs) else fs.unstrip_protocol(path)


@contextlib.contextmanager
def accessing(fs, path: str, role: str = "input"):
    """Turn storage failures (denied, bad credentials, unreachable endpoint) into one clear error.

    The message names the URL and the cause, never the credentials (botocore does not print them).
    """
    try:
        yield
    except ClipNsfwError:
        raise
    except Exception as err:  # noqa: BLE001 - s3fs/botocore/pyarrow raise many unrelated types
        if not is_storage_error(err):
            raise  # a data or programming error must not be blamed on credentials
        error = InputError if role == "input" else OutputError
        check = ("The store did not answer (a connection refused, reset or timed out): check the endpoint and the "
                 "network; if it was down for a moment, run again (with --resume once an output was started)."
                 if is_unreachable(err) and not is_local(fs) else
                 "Check the path and its permissions." if is_local(fs) else
                 "Check the path, the HDFS user the job acts as (--storage-option user=NAME) and its permissions "
                 "(hdfs dfs -ls / -chmod / -chown), and the NameNode's address." if is_hierarchical(fs) else
                 "Check the path, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                 "--storage-option) and the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=…).")
        raise error(f"cannot access {role} {unstrip(fs, path)}: {type(err).__name__}: {err}. {check}") from err


def is_storage_error(err: BaseException) -> bool:
    """True for a failure of the store rather than of the data or the code: OSError (s3fs maps most S3
    failures to it, pyarrow's IO errors and requests' are OSErrors), a botocore error (a connection refused or
    reset is botocore's own type, no OSError), or the RuntimeError fsspec's WebHDFS client raises for an HDFS
    RemoteException it does not map (SafeModeException after a NameNode restart, StandbyException,
    RetriableException …)."""
    if isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
        return True
    return type(err) is RuntimeError and raised_in(err).endswith("fsspec/implementations/webhdfs.py")


def is_unreachable(err: BaseException) -> bool:
    """True for a store that did not answer: a connection refused, reset or closed, a timeout (builtin,
    botocore, aiohttp and requests name every such type with "Connection" or "Timeout")."""
    names = [kind.__name__ for kind in type(err).__mro__]
    if any("SSL" in name or "Certificate" in name or "Proxy" in name for name in names):
        return False  # the store answered, or a proxy did: TLS or proxy settings, not an outage
    return any("Connection" in name or "Timeout" in name for name in names)


def raised_in(err: BaseException) -> str:
    """The file (``/``-separated) of the innermost frame of ``err``'s traceback: where it was raised ("" if
    it has no traceback)."""
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return "" if frame is None else frame.tb_frame.f_code.co_filename.replace("\\", "/")


# --------------------------------------------------------------------- files the job rewrites, read fresh
# fsspec stores keep what they learnt of a path: s3fs answers info()/exists()/ls() from its listing cache
# and opens a file with the ETag it cached, so a file rewritten since (the lease at every heartbeat, task
# states, the job state, the report) would read as gone, as it was, or fail with FileExpired. Every read of
# such a file, and every listing that is repeated, goes through these helpers: the cache entry is dropped
# first and the file is fetched with one plain GET (``cat_file``), which sends no ETag.

FRESH_ATTEMPTS = 4


def _one_request(fs) -> dict:
    """``cat_file`` options that make it one GET: s3fs ≥ 2025 first asks the size (a HEAD per file) to
    decide whether to fetch a large file in parallel parts; the files read fresh are small state files."""
    cat_file = getattr(fs, "_cat_file", None)
    try:
        takes = cat_file is not None and "max_concurrency" in inspect.signature(cat_file).parameters
    except (TypeError, ValueError):
        takes = False
    return {"max_concurrency": 1} if takes else {}


def read_fresh(fs, path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path`` as the store holds them now (at most its first ``max_bytes``: one ranged
    request, whatever the file has grown to). FileNotFoundError when it does not exist; a FileExpired
    (rewritten while read) is retried fresh, never passed on."""
    limits = {} if max_bytes is None else {"start": 0, "end": max_bytes}
    if is_webhdfs(fs):  # one OPEN: fsspec's cat_file asks the size first, then reads (a rename in between cuts it)
        length = {} if max_bytes is None else {"offset": 0, "length": max_bytes}
        return fs._call("OPEN", path=path, redirect=True, **length).content
    for attempt in range(FRESH_ATTEMPTS):
        fs.invalidate_cache(path)
        try:
            return fs.cat_file(path, **limits, **_one_request(fs))
        except OSError as err:
            if not is_expired(err) or attempt == FRESH_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def is_expired(err: BaseException) -> bool:
    """s3fs's FileExpired (an OSError, EBUSY): the file changed since its ETag was cached."""
    return isinstance(err, OSError) and type(err).__name__ == "FileExpired"


def read_many_fresh(fs, paths: list[str], threads: int = 16) -> dict[str, bytes | Exception]:
    """``{path: bytes, or the exception met}`` for many small files, ``threads`` GETs at a time, each past
    the cache. (Not fsspec's batched ``cat``: it expands glob characters, and an output named ``out[1]``
    must be read as it is spelled.)"""
    def one(path: str) -> bytes | Exception:
        try:
            return read_fresh(fs, path)
        except Exception as err:  # noqa: BLE001 - reported per path; the caller decides
            return err

    if len(paths) <= 1 or is_local(fs):
        return {path: one(path) for path in paths}
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def list_fresh(fs, folder: str) -> list[str]:
    """The paths directly in ``folder`` now ([] when it does not exist), past the listing cache."""
    fs.invalidate_cache(folder)
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return [path for path in paths if path.rstrip("/") != folder.rstrip("/")]  # not its own "folder" key


def find_fresh(fs, root: str) -> set[str]:
    """Every file under ``root`` now (one recursive listing: on S3 a page per 1,000 keys, not a request
    per file), past the listing cache; an empty set when ``root`` does not exist."""
    return set(find_sizes_fresh(fs, root))


def find_sizes_fresh(fs, root: str, expected: Collection[str] = (), weight: int = 1) -> dict[str, int]:
    """``find_fresh`` with each file's size in bytes. ``expected``: paths the caller expects to find (each
    standing for ``weight``); on S3, many make the one listing run as key ranges at once
    (``s3_listing.find_in_ranges``: the same files, found whether expected or not)."""
    fs.invalidate_cache(root)
    try:
        found = find_in_ranges(fs, root, expected, weight) if expected else None
        if found is None:
            found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    # Zero-byte "folder" keys (an S3 console's "Create folder", some writers' markers) are not files.
    return {path.rstrip("/"): info.get("size") for path, info in found.items()
            if not path.endswith("/") and info.get("type") != "directory"}


def kind_fresh(fs, path: str) -> str | None:
    """``"file"``, ``"directory"`` (or another type the store names) for ``path`` now, None when it does not
    exist; past the cache. One HEAD (and a one-key listing) on S3, where ``isdir`` lists every key of the
    folder's top level."""
    fs.invalidate_cache(path)
    try:
        return fs.info(path).get("type") or "file"
    except FileNotFoundError:
        return None


def exists_fresh(fs, path: str) -> bool:
    """Whether ``path`` exists now, past the cache (a file written or removed since the last listing)."""
    fs.invalidate_cache(path)
    return fs.exists(path)


def remove(fs, path: str, recursive: bool = False) -> None:
    """Remove ``path`` as it is spelled, never as a pattern: fsspec's ``rm`` expands ``[``, ``?`` and ``*``
    (``rm("b/out[1]")`` removes ``b/out1``). A folder, with ``recursive``: every file listed under it, then
    its folders. A path that is already gone is not an error; a symlink is removed, never followed."""
    if is_local(fs):
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path) if recursive else os.rmdir(path)
        return
    if is_webhdfs(fs):  # DELETE takes the path literally (no glob) and a whole folder at once
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(path)
        return
    files = sorted(find_fresh(fs, path)) if recursive else []
    for name in files or [path]:
        try:
            fs.rm_file(name)
        except FileNotFoundError:
            pass
    if recursive:  # stores with real folders (HDFS); on object stores nothing is left to remove
        folders = {posixpath.dirname(name) for name in files} | {path}
        for folder in sorted(folders, key=len, reverse=True):
            if folder == path or folder.startswith(path.rstrip("/") + "/"):
                try:
                    fs.rmdir(folder)
                except Exception:  # noqa: BLE001 - not empty, not a folder, or no folders at all
                    pass
    fs.invalidate_cache(path)


def write_whole(fs, path: str, data: bytes | str) -> None:
    """Write a small file so that no reader ever sees it half-written: aside and renamed over ``path``
    where the store renames atomically (local disks, HDFS), one PUT on object stores (an object appears
    whole or not at all). State files, reports and markers go through here; a kill leaves the old file
    or the new one, never a truncated one."""
    data = data.encode() if isinstance(data, str) else data
    if not renames_atomically(fs):
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return
    folder, name = posixpath.split(path)
    # "_clip_nsfw" first: Spark and the resume skip it, and --overwrite knows it as this tool's own.
    aside = join(folder, f"_clip_nsfw_aside.{uuid.uuid4().hex[:12]}.{name}")
    try:
        with fs.open(aside, "wb") as handle:
            handle.write(data)
        rename_file(fs, aside, path, replace=True)  # rename(2) / HDFS rename2: the old file replaced in one step
    except BaseException:
        with contextlib.suppress(Exception):
            remove(fs, aside)
        raise
    fs.invalidate_cache(path)
