"""The model cache: find, download, verify, extract and convert LAION's safety heads (listed in registry.py).

The registry holds three kinds of model (``ModelSpec.kind``): the Autokeras NSFW zips (``keras-zip``),
the ViT-H/14 NSFW head as a PyTorch state dict (``torch-state-dict``, read by torch_weights.py without
torch) and the violence prompt embeddings (``prompts``, see prompts.py). Each file is pinned by its
sha256, or by its git blob id where no sha256 is published, and checked on download and on every use.

Two kinds of directory are involved:

* the **zip directory** holds the original LAION files (zips, .pth, .npy). It is ``$CLIP_NSFW_CACHE``
  when set (it may be read-only: tests and CI point it at a folder of pre-downloaded files), else the
  writable cache below.
* the **writable cache** (``$CLIP_NSFW_HOME``, else ``$XDG_CACHE_HOME/clip-nsfw-spark``, else
  ``~/.cache/clip-nsfw-spark``) receives downloads that cannot go to the zip directory and every derived
  file: the extracted SavedModel and the portable weights file, under ``derived/<sha256 prefix>-w<format
  version>-<order hash>/``, so neither a changed zip nor an older weights format or summation order can be
  confused with this conversion.

Every step that writes is guarded by a file lock and writes to a temporary name first, then renames:
many processes asking for the same model at once cause one download and one conversion, and nobody ever
sees a half-written file under its final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from filelock import FileLock

from clip_nsfw_spark.errors import ChecksumError, ModelError, UnknownModelError, UnsafeArchiveError
from clip_nsfw_spark.models.registry import KIND_KERAS_ZIP, KIND_TORCH, PORTABLE_SUFFIX, REGISTRY, ModelSpec, canonical_name
from clip_nsfw_spark.scoring.weights import FORMAT_VERSION, ORDER

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- directories


def zip_dir() -> Path:
    """Directory holding the original zips (``$CLIP_NSFW_CACHE``, possibly read-only)."""
    env = os.environ.get("CLIP_NSFW_CACHE")
    return Path(env).expanduser() if env else writable_cache_dir()


def writable_cache_dir() -> Path:
    """Directory for downloads that cannot go to ``zip_dir()`` and for all derived files."""
    env = os.environ.get("CLIP_NSFW_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clip-nsfw-spark"


def _is_writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return _may_write_in(path)


def _may_write_in(folder: Path) -> bool:
    """True when this process may write in ``folder`` *and* its mode lets someone write there. Root passes
    every ``os.access`` check: a folder made read-only on purpose (``chmod 555``: CI's ../shared/models, a
    baked image's cache) would get lock files, downloads and deletions of the user's files."""
    try:
        writable_bits = folder.stat().st_mode & 0o222
    except OSError:
        return False
    return bool(writable_bits) and os.access(folder, os.W_OK | os.X_OK)


def _lock(path: Path) -> FileLock:
    """A lock file beside ``path`` (in the writable cache when ``path``'s folder is read-only)."""
    folder = path.parent if _is_writable_dir(path.parent) else writable_cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / (path.name + ".lock")))


# ------------------------------------------------------------------------------------------------ hashing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(path: Path) -> dict[str, str]:
    """``{"sha256": hex, "git blob id": hex}`` of a file, from one read in 1 MiB blocks.

    The git blob id is sha1(b"blob <size>\\0" + content): what ``git hash-object`` prints, and the only
    published identity of upstream files that have no published sha256.
    """
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(block)
            blob.update(block)
    return {"sha256": sha256.hexdigest(), "git blob id": blob.hexdigest()}


def pin_mismatch(path: Path, spec: ModelSpec) -> str | None:
    """None when ``path`` matches ``spec``'s pin, else the digest found (of the pin's kind)."""
    kind, expected = spec.pin
    found = file_digests(path)[kind]
    return None if found == expected else found


# ---------------------------------------------------------------------------------------------- download


def _download(url: str, target: Path, spec: ModelSpec) -> None:
    """Download ``url`` to ``target`` atomically, refusing content that does not match ``spec``'s pin."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s -> %s", url, target)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        os.chmod(tmp, 0o644)
        found = pin_mismatch(tmp, spec)
        if found is not None:
            kind, expected = spec.pin
            raise ChecksumError(
                f"downloaded {url} has {kind} {found}, expected {expected}; the file was removed. "
                "The upstream file changed or the download was tampered with: do not use it."
            )
        os.replace(tmp, target)
    except OSError as err:
        raise ModelError(
            f"could not download {url} to {target}: {err}. Without network access, put the file into "
            f"the folder named by CLIP_NSFW_CACHE (now {zip_dir()})."
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def fetch_file(spec: ModelSpec) -> Path:
    """Return the verified path of ``spec``'s file, downloading it once if no cache holds it.

    Raises ChecksumError when a cached file does not match the pin (sha256 or git blob id); a bad file
    in a writable cache is removed so that the next call downloads it again. The pin is checked on every
    call, not only after a download.
    """
    candidates = [zip_dir() / spec.file_name, writable_cache_dir() / spec.file_name]
    for path in candidates:
        if path.is_file():
            _verify_cached(path, spec)
            return path
    target = candidates[0] if _is_writable_dir(candidates[0].parent) else candidates[1]
    with _lock(target):
        if not target.is_file():  # another process may have finished the download while we waited
            _download(spec.url, target, spec)
    _verify_cached(target, spec)
    return target



def _verify_cached(path: Path, spec: ModelSpec) -> None:
    found = pin_mismatch(path, spec)
    if found is None:
        return
    kind, expected = spec.pin
    removed = ""
    if _may_write_in(path.parent):
        path.unlink(missing_ok=True)
        removed = " It was removed; the next run downloads it again."
    raise ChecksumError(
        f"{path} has {kind} {found}, but {spec.name} is pinned to {expected} ({kind}).{removed} "
        f"Replace it with the original {spec.file_name} from {spec.url}."
    )


# ----------------------------------------------------------------------------------------------- extract


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a zip into ``destination``, refusing absolute paths, ``..`` members and links.

    Extraction goes to a temporary sibling directory that is renamed into place, so ``destination``
    either does not exist or is complete.
    """
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            member = PurePosixPath(info.filename.replace("\\", "/"))
            if member.is_absolute() or ".." in member.parts or info.filename.startswith(("/", "\\")):
                raise UnsafeArchiveError(
                    f"{archive} holds the member {info.filename!r}, which would be written outside the "
                    "extraction directory; refusing to extract it. Use the original model archive."
                )
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UnsafeArchiveError(f"{archive} holds the symbolic link {info.filename!r}; refusing it.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=destination.name + ".", dir=destination.parent))
        try:
            zf.extractall(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by users
            os.replace(tmp, destination)
        except OSError:
            if destination.is_dir():  # someone else finished first: theirs is as good as ours
                return
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def find_saved_model(root: Path) -> Path:
    """The directory under ``root`` (itself included) that holds ``saved_model.pb``."""
    hits = sorted(p.parent for p in root.rglob("saved_model.pb"))
    if len(hits) != 1:
        raise ModelError(
            f"expected exactly one saved_model.pb under {root}, found {len(hits)}. A model must be a "
            "TensorFlow SavedModel directory (or a zip of one) like LAION's clip_autokeras_*.zip."
        )
    return hits[0]


# --------------------------------------------------------------------------------------------- resolution


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are. ``portable`` exists; ``saved_model`` may be None for .npz models."""

    name: str
    sha256: str
    portable: Path
    saved_model: Path | None
    source: Path


def derived_dir(sha256: str) -> Path:
    """Cache directory of the files derived from a model's content, keyed by the portable-weights format and
    summation order too: after either changes, a model is re-derived, never scored from an older file."""
    order = hashlib.sha256(ORDER.encode()).hexdigest()[:8]
    return writable_cache_dir() / "derived" / f"{sha256[:16]}-w{FORMAT_VERSION}-{order}"


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def prepare_model(model: str | os.PathLike) -> ResolvedModel:
    """Fetch, verify, extract and convert ``model`` so that its portable file exists.

    ``model`` is a registry name ("vit-l-14", "ViT-B/32", "open_clip:ViT-H-14", "violence-l-14" …), a
    portable ``.npz`` written by this package, a path to a SavedModel directory or a zip of one, or a
    PyTorch ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict of a Linear/ReLU MLP (torch_weights.py).
    Conversion happens once per model content (the result is cached under the content's sha256):
    SavedModels need TensorFlow, state dicts need nothing beyond numpy.
    """
    text = os.fspath(model)
    registry_name = canonical_name(text)
    if registry_name is not None:
        spec = REGISTRY[registry_name]
        source = fetch_file(spec)
        if spec.kind == KIND_KERAS_ZIP:
            return _prepare_archive(source, spec.name, spec.sha256)
        digest = spec.sha256 or file_digests(source)["sha256"]  # the cache key is always a sha256
        return _prepare_converted(source, spec.name, digest, spec.kind)

    path = Path(text).expanduser()
    if not path.exists():
        aliases = ", ".join(repr(a) for spec in REGISTRY.values() for a in spec.aliases)
        raise UnknownModelError(
            f"unknown model {text!r}: it is not a registry name ({', '.join(REGISTRY)}; 'ViT-L/14', "
            f"'ViT-B/32', {aliases} are accepted too) and no file or directory exists at that path."
        )
    if path.is_file() and path.name.endswith(".npz"):
        return ResolvedModel(path.stem, sha256_file(path), path.resolve(), None, path.resolve())
    if path.is_file() and (path.suffix.lower() in TORCH_SUFFIXES or _is_torch_zip(path)):
        return _prepare_converted(path.resolve(), path.stem, sha256_file(path), KIND_TORCH)
    if path.is_file() and zipfile.is_zipfile(path):
        return _prepare_archive(path.resolve(), path.stem, sha256_file(path))
    if path.is_dir() and (path / "model.nsfw.npz").is_file():  # a folder written by `clip-nsfw-spark train`
        portable = path / "model.nsfw.npz"
        return ResolvedModel(path.name, sha256_file(portable), portable.resolve(), None, path.resolve())
    if path.is_dir():
        saved_model = find_saved_model(path)
        digest = _directory_sha256(saved_model)
        portable = derived_dir(digest) / (path.name + PORTABLE_SUFFIX)
        _convert_once(saved_model, portable)
        return ResolvedModel(path.name, digest, portable, saved_model, path.resolve())
    raise UnknownModelError(
        f"{path} is neither a SavedModel directory, a zip of one, a PyTorch state dict (.pth, .pt, .bin, "
        ".safetensors) nor a portable .npz weights file."
    )


def _is_torch_zip(path: Path) -> bool:
    """A zip written by ``torch.save`` holds ``<folder>/data.pkl`` (and no SavedModel)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in zf.namelist())


def _prepare_converted(source: Path, name: str, sha256: str, kind: str) -> ResolvedModel:
    """Convert a state dict (KIND_TORCH) or prompt embeddings (KIND_PROMPTS) once into the derived cache."""
    portable = derived_dir(sha256) / (name + PORTABLE_SUFFIX)
    if not portable.is_file():
        portable.parent.mkdir(parents=True, exist_ok=True)
        with _lock(portable):
            if not portable.is_file():
                if kind == KIND_TORCH:
                    from clip_nsfw_spark.models.torch_weights import convert_state_dict_file  # numpy only: never imports torch

                    expected = REGISTRY[name].dim if name in REGISTRY else None
                    convert_state_dict_file(source, name, registry=name in REGISTRY, dim=expected).save(portable)
                else:
                    from clip_nsfw_spark.scoring.prompts import PromptHead

                    PromptHead.from_npy(source, name).save(portable)
    return ResolvedModel(name, sha256, portable, None, source)


def _extract_once(archive: Path, sha256: str) -> Path:
    """The SavedModel directory of ``archive``, extracted (once, under a lock) into the derived cache."""
    extracted = derived_dir(sha256) / "saved_model"
    with _lock(extracted):
        if not extracted.is_dir():
            safe_extract(archive, extracted)
    return find_saved_model(extracted)


def _prepare_archive(archive: Path, name: str, sha256: str) -> ResolvedModel:
    portable = derived_dir(sha256) / (name + PORTABLE_SUFFIX)
    extracted = derived_dir(sha256) / "saved_model"
    if portable.is_file():  # converted before: extraction is needed only by the TensorFlow backend
        saved_model = find_saved_model(extracted) if extracted.is_dir() else None
    else:
        saved_model = _extract_once(archive, sha256)
        _convert_once(saved_model, portable)
    return ResolvedModel(name, sha256, portable, saved_model, archive)


def _convert_once(saved_model: Path, portable: Path) -> None:
    if portable.is_file():
        return
    portable.parent.mkdir(parents=True, exist_ok=True)
    with _lock(portable):
        if portable.is_file():
            return
        from clip_nsfw_spark.models.convert import convert_saved_model  # imports TensorFlow: only here, only once per model

        weights = convert_saved_model(saved_model)
        weights.save(portable)


def _directory_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def saved_model_dir(model: str | os.PathLike) -> Path:
    """The SavedModel directory of ``model`` (for the TensorFlow reference backend)."""
    resolved = prepare_model(model)
    if resolved.saved_model is not None:
        return resolved.saved_model
    registry_name = canonical_name(os.fspath(model))
    if registry_name is None:
        raise ModelError(f"{model} is a portable weights file: it has no SavedModel for TensorFlow.")
    if REGISTRY[registry_name].kind != KIND_KERAS_ZIP:
        raise ModelError(f"{registry_name} is a {REGISTRY[registry_name].kind} model: it has no SavedModel for "
                         "TensorFlow; score it with the numpy backend.")
    return _extract_once(resolved.source, resolved.sha256)
