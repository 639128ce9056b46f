#!/usr/bin/env bash
# From a fresh clone: install into .venv (if needed), generate a LAION-like sample, score it on local Spark.
# Usage: bash jobs/demo.sh [ROWS]    (the model comes from $CLIP_NSFW_CACHE, the cache, or its public URL)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-1000000}"
if [ ! -x .venv/bin/clip-nsfw-spark ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[tensorflow,spark]"
fi
if [ -z "${CLIP_NSFW_CACHE:-}" ] && [ -d ../shared/models ]; then export CLIP_NSFW_CACHE="$(cd ../shared/models && pwd)"; fi
export PYSPARK_PYTHON="$PWD/.venv/bin/python"
rm -rf sample out/demo
.venv/bin/clip-nsfw-spark sample sample/input --rows "$rows" --files 10
.venv/bin/clip-nsfw-spark run --input sample/input --output out/demo --master "local[*]"
