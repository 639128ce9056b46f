"""Generate LAION-like sample datasets (for the demo, the tests and the benchmark).

Embeddings are random unit vectors quantised to float16, like LAION's; a small share is pushed towards
a fixed direction so that scores are not all alike. Metadata columns mimic LAION's: key, url, caption.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.storage.filesystem import filesystem, join
from clip_nsfw_spark.executor.writer import scalar_columns


def embeddings(rows: int, dim: int, seed: int, dtype=np.float16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    x[: rows // 10] += rng.normal(size=dim).astype(np.float32) * 0.15  # a cluster of look-alikes
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def metadata(rows: int, start: int) -> dict:
    keys = np.arange(start, start + rows)
    return {"key": pa.array([f"{k:09d}" for k in keys]),
            "url": pa.array([f"https://example.com/img/{k}.jpg" for k in keys]),
            "caption": pa.array([f"sample caption {k}" for k in keys])}


def embedding_array(x: np.ndarray, fixed: bool) -> pa.Array:
    flat = pa.array(x.reshape(-1))
    if fixed:
        return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def write_parquet_sample(output: str, rows: int, files: int = 4, dim: int = 768, dtype=np.float16,
                         fixed: bool = True, row_group_rows: int = 65536, seed: int = 0,
                         storage_options: dict | None = None) -> list[str]:
    """Write ``files`` parquet files of LAION-like rows with an ``embedding`` column; return their paths."""
    fs, root = filesystem(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    paths, start = [], 0
    per_file = -(-rows // files)
    for index in range(files):
        n = min(per_file, rows - start)
        if n <= 0:
            break
        table = pa.table(metadata(n, start) | {"embedding": embedding_array(embeddings(n, dim, seed + index, dtype), fixed)})
        path = join(root, f"part-{index:05d}.parquet")
        with fs.open(path, "wb") as handle:
            pq.write_table(table, handle, row_group_size=row_group_rows, compression="zstd",
                           use_dictionary=scalar_columns(table.schema))
        paths.append(path)
        start += n
    return paths


def write_laion_sample(output: str, rows: int, files: int = 2, dim: int = 768, seed: int = 0) -> None:
    """Write the clip-retrieval layout: img_emb/img_emb_N.npy + metadata/metadata_N.parquet."""
    os.makedirs(os.path.join(output, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(output, "metadata"), exist_ok=True)
    start, per_file = 0, -(-rows // files)
    for index in range(files):
        n = min(per_file, rows - start)
        np.save(os.path.join(output, "img_emb", f"img_emb_{index}.npy"), embeddings(n, dim, seed + index))
        pq.write_table(pa.table(metadata(n, start)), os.path.join(output, "metadata", f"metadata_{index}.parquet"),
                       row_group_size=max(1, n // 3))
        start += n


LABELLED_CLASSES = {1: ("porn", "sexy"), 0: ("neutral", "drawings")}


def separable(rows: int, dim: int, seed: int, shift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Generated labelled embeddings (float16 unit vectors): label 1 rows are shifted along one fixed
    direction, label 0 rows against it. Separable but noisy; the direction depends only on ``dim``."""
    direction = np.random.default_rng(dim).normal(size=dim)
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng(seed)
    labels = (np.arange(rows) % 2).astype(int)
    x = rng.normal(size=(rows, dim)) / np.sqrt(dim) + np.outer(2 * labels - 1, direction) * shift
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def write_labelled_sample(output: str, rows: int, dim: int = 768, seed: int = 0) -> None:
    """LAION's test-set layout with generated data: porn/ sexy/ (label 1) and neutral/ drawings/ (label 0),
    each with img_emb/img_emb_0.npy."""
    x, labels = separable(rows, dim, seed)
    for label, classes in LABELLED_CLASSES.items():
        part = x[labels == label]
        for i, name in enumerate(classes):
            os.makedirs(os.path.join(output, name, "img_emb"), exist_ok=True)
            np.save(os.path.join(output, name, "img_emb", "img_emb_0.npy"), part[i::len(classes)])
