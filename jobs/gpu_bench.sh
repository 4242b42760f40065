#!/usr/bin/env bash
# The GPU benchmark, runnable on a bare GPU image: Python with torch, transformers and their usual company, but
# no diffusers, no Ray, no package registry and no network. Nothing is installed: wheels in a git-ignored
# .whl/ folder (diffusers, requests and its dependencies; docs/gpu.md says which) are unpacked into a
# temporary folder put on PYTHONPATH, and jobs/gpu_bench.py runs with ${PYTHON:-python3} as it is.
#
#   bash jobs/gpu_bench.sh --part eager       # the engine rows (layouts per component, tiny decoder, baseline, CLIP)
#   bash jobs/gpu_bench.sh --part compiled    # whole-model and per-block compile, cold and warm
#   bash jobs/gpu_bench.sh --part train       # the ConvNetD3 evaluation runs of one protocol, in process
#   bash jobs/gpu_bench.sh --smoke            # eager and train with the tiny models on the CPU, under a minute
#
# Each row is appended to $OUT/gpu_bench_rows.jsonl (OUT defaults to bench_results/) the moment it is measured,
# and the whole result goes to $OUT/gpu_bench_<part>.json at the end; see `--help` for the sizes.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export OUT=${OUT:-bench_results}
export PYTHONUNBUFFERED=1 # rows reach the log as they are measured, even through a pipe
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} # every model is built here: no hub lookup to wait on without a network
path="$PWD"
site=""
cleanup() { if [ -n "$site" ]; then rm -rf "$site"; fi; }
trap cleanup EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gdd-wheels.XXXXXX")
    "$PYTHON" jobs/unpack_wheels.py .whl "$site"
    path="$path:$site"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PYTHON" jobs/gpu_bench.py "$@"
