#!/usr/bin/env bash
# The whole GPU check in one call, from the source tree (no install, no network):
#   1. the gpu-marked tests, required to run (FASTRADAM_REQUIRE_GPU=1 turns skips into failures);
#   2. the GPU benchmarks (bench/test_bench_gpu.py, and the torch drop-in's CUDA cases in
#      bench/test_bench_wrapper.py), JSON plus a Markdown table under
#      bench/results/, named after the device (nvidia-smi --query-gpu=name).
# Needs python3 with cupy, numba, torch, pytest and pytest-benchmark. Exits non-zero if any
# step failed, after running them all. Usage: bash bench/gpu_check.sh  (PYTHON=... to pick one)
set -uo pipefail
cd "$(dirname "$0")/.."

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export FASTRADAM_REQUIRE_GPU=1
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/fastradam-numba-cache}"
python="${PYTHON:-python3}"

device="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
slug="$(printf '%s' "${device:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
results="bench/results"
mkdir -p "$results"
echo "== device: ${device:-unknown} -> $results/gpu-$slug.{json,md}"

status=0
echo "== gpu tests"
"$python" -m pytest -q -p no:cacheprovider -m gpu tests || status=1

echo "== gpu benchmark"
"$python" -m pytest -q -p no:cacheprovider -m gpu bench/test_bench_gpu.py bench/test_bench_wrapper.py \
    --benchmark-json="$results/gpu-$slug.json" --benchmark-columns=median,rounds,iterations || status=1
if [ -f "$results/gpu-$slug.json" ]; then
    "$python" -m fastradam.bench.report "$results/gpu-$slug.json" --markdown "$results/gpu-$slug.md" --no-plots || status=1
fi
exit "$status"
