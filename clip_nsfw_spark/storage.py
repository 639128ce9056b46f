"""Filesystems: one place that turns a URL (local path, file://, s3://, hdfs://, …) into an fsspec filesystem.

s3:// needs s3fs, which reads credentials from the usual AWS environment and config files
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL …); ``storage_options`` from the
job config are passed to the filesystem as they are (endpoint_url, anon, profile, client_kwargs …).
hdfs:// goes through pyarrow's HadoopFileSystem and needs libhdfs and a Hadoop client configuration on
every machine (untested here: no HDFS is available on this machine kind).
"""

from __future__ import annotations

import contextlib
import posixpath

import fsspec

from .errors import ClipNsfwError, InputError, MissingDependencyError, OutputError


def filesystem(url: str, storage_options: dict | None = None):
    """Return ``(fs, path)`` for ``url``: the path is what ``fs`` methods take (no protocol for s3)."""
    options = dict(storage_options or {})
    if "endpoint_url" in options and url.startswith("s3"):
        options.setdefault("client_kwargs", {})
        options["client_kwargs"] = dict(options["client_kwargs"], endpoint_url=options.pop("endpoint_url"))
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise MissingDependencyError(f"reading {url} needs an fsspec backend: {err}. For s3:// run "
                                     "pip install 'clip-nsfw-spark[s3]'") from err
    return fs, path.rstrip("/") if path not in ("/",) else path


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


def unstrip(fs, path: str) -> str:
    """A full URL for messages: path with its protocol (s3://bucket/key), or the local path."""
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
        if not _is_storage_error(err):
            raise  # a data or programming error must not be blamed on credentials
        error = InputError if role == "input" else OutputError
        raise error(
            f"cannot access {role} {unstrip(fs, path)}: {type(err).__name__}: {err}. Check the path, the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --storage-option) and the "
            "endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=…)."
        ) from err


def _is_storage_error(err: BaseException) -> bool:
    """OSError (s3fs maps most S3 failures to it, pyarrow's IO errors are OSErrors) or a botocore error."""
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")
