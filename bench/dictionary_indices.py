"""Probe (issue #27): what scoring a float16 column from its dictionary indices would save, on a real file.

The job decodes a pyarrow-written float16 column by gathering each value from the chunk's dictionary
(``levels.gather_dictionary``, uint16 bits), then the scorer turns each value into float32 through a
65,536-entry table (``kernels.encode_rows``). The alternative measured here: decode only the indices
(``levels.decode_levels`` over the same hybrid stream) and score them through a *composed* table,
``table16[dictionary]`` (index → float32): the same float32 value for every entry by construction, so the
same bits (checked), one gather fewer. It would help only outputs that do not write the embedding column
back (scores only): annotate must write the values, so it would gather them anyway.

Not the job's code: the decoder's ``gather_dictionary`` is swapped for an index decoder inside this process.
Single thread, one process; alternates the two ways ``--repeats`` times over ``--groups`` row groups.

    PYTHONPATH=. python bench/dictionary_indices.py /work/benchdata/f16-2/part-00000.parquet --groups 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench import _cpu_model, load_scorer, versions  # noqa: E402  (bench/ is on sys.path: this script's folder)
from clip_nsfw_spark.parquet import values as values_module  # noqa: E402
from clip_nsfw_spark.parquet.decode import read_float_list_column  # noqa: E402
from clip_nsfw_spark.parquet.levels import decode_levels, gather_dictionary  # noqa: E402
from clip_nsfw_spark.scoring import scorer as scorer_module  # noqa: E402
from clip_nsfw_spark.scoring.kernels import read_only_view, score_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a parquet file whose embedding column pyarrow wrote as float16")
    parser.add_argument("--column", default="embedding")
    parser.add_argument("--model", default="vit-l-14")
    parser.add_argument("--groups", type=int, default=8, help="row groups read per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    metadata = pq.ParquetFile(args.path).metadata
    groups = range(min(args.groups, metadata.num_row_groups))
    scorer = load_scorer(args.model)
    table16 = scorer_module._FLOAT16_TO_FLOAT32
    dictionaries: list[np.ndarray] = []

    def indices_only(buf, bw, n, dictionary, out):  # the swap: out gets the indices, not dictionary[indices]
        dictionaries.append(dictionary)
        return n if decode_levels(buf, bw, n, out) else -1

    def score(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
        s, layers = scorer, scorer._layers
        scores = np.empty(len(raw), np.float32)
        score_rows(read_only_view(raw), table, s._mean, s._scale, s._columns, s._lo, s._hi, s._codes, s._starts,
                   s._defaults, tuple(layer.panels for layer in layers), tuple(layer.bias for layer in layers),
                   np.array([layer.relu for layer in layers], np.int64),
                   np.array([layer.width for layer in layers], np.int64), scorer_module.CHUNK_ROWS, s._sigmoid,
                   scores)
        return scores

    def one_pass(composed: bool) -> tuple[float, float, np.ndarray]:
        values_module.gather_dictionary = indices_only if composed else gather_dictionary
        decode_seconds = score_seconds = 0.0
        scores = []
        with open(args.path, "rb") as handle:
            for group in groups:
                dictionaries.clear()
                started = time.perf_counter()
                array = read_float_list_column(handle, metadata, group, args.column)
                if array is None:
                    raise SystemExit(f"row group {group}: the job's decoder does not decode {args.column!r}")
                raw = array.values.to_numpy(zero_copy_only=False).view(np.uint16).reshape(len(array), -1)
                table = table16
                if composed:
                    first = dictionaries[0] if dictionaries else None
                    if first is None or any(not np.array_equal(d, first) for d in dictionaries):
                        raise SystemExit(f"row group {group}: not one dictionary for every page (PLAIN fallback?)")
                    table = table16[dictionaries[0]]
                decoded = time.perf_counter()
                scores.append(score(raw, table))
                score_seconds += time.perf_counter() - decoded
                decode_seconds += decoded - started
        return decode_seconds, score_seconds, np.concatenate(scores)

    one_pass(False), one_pass(True)  # warm: numba's kernels for both tables, the file in the page cache
    rounds = []
    for _ in range(args.repeats):
        gathered, composed = one_pass(False), one_pass(True)
        rows = len(gathered[2])
        values = rows * scorer.dim
        same = np.array_equal(gathered[2].view(np.uint32), composed[2].view(np.uint32))
        rounds.append({"rows": rows,
                       "gather_decode_ns_per_value": gathered[0] / values * 1e9,
                       "gather_score_us_per_row": gathered[1] / rows * 1e6,
                       "indices_decode_ns_per_value": composed[0] / values * 1e9,
                       "indices_score_us_per_row": composed[1] / rows * 1e6,
                       "seconds": [gathered[0] + gathered[1], composed[0] + composed[1]],
                       "same_bits": bool(same)})
        r = rounds[-1]
        print(f"{rows:,} rows: gather + table16: decode {r['gather_decode_ns_per_value']:.2f} ns/value, score "
              f"{r['gather_score_us_per_row']:.2f} us/row | indices + composed table: decode "
              f"{r['indices_decode_ns_per_value']:.2f}, score {r['indices_score_us_per_row']:.2f} | "
              f"{r['seconds'][0]:.3f} s → {r['seconds'][1]:.3f} s | same bits: {same}")
        if not same:
            raise SystemExit("the composed table changed a score's bits")
    medians = {key: float(np.median([r[key] for r in rounds])) for key in rounds[0] if key.endswith(("_value", "_row"))}
    print("medians: " + ", ".join(f"{key} {value:.2f}" for key, value in medians.items()))
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"cpu": _cpu_model(), "versions": versions(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "file": args.path,
                       "groups": len(groups), "medians": medians, "rounds": rounds}, out, indent=1)


if __name__ == "__main__":
    main()
