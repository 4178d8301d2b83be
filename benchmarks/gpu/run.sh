#!/usr/bin/env bash
# One GPU session: CUDA tests, kernel benchmarks, decode-attention benchmark, KVCache host
# costs, other shapes, one-query table plans -> $OUT (default ./gpu_out).
#
# Usage (repository root, on the GPU machine; the machine's setup: docs/gpu.md):
#   bash benchmarks/gpu/run.sh [tests|bench|kv|attend|shapes|tables|variants|all] [pytest -k expression]
#   (or python -m benchmarks.gpu ...), then, with $OUT brought back:
#   python -m benchmarks.tools.gpu_results DIR --card "NVIDIA H200"
# numba-cuda 0.30 needs numpy < 2.5 (docs/gpu.md). Where the GPU machine has a newer numpy and
# no package registry, download the wheels beforehand into a folder and name it in WHEELS
# (e.g. WHEELS=.whl): they are installed into $WHEELS_TARGET (default /tmp/site), which goes
# first on PYTHONPATH, before anything imports numpy.
# Precompile the generated kernels first where there is no GPU (the PTX cache travels):
#   ROTORQ_PTX_CACHE=$PWD/.whl/ptxcache python3 -m benchmarks.gpu.bench --precompile-only
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
what=${1:-all}
sel=${2:-}
if [[ -n ${WHEELS:-} ]]; then
    target=${WHEELS_TARGET:-/tmp/site}
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$WHEELS"/*.whl \
        || { echo "installing the wheels of $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/device.txt"
if [[ $what == tests || $what == all ]]; then
    args=(-m cuda tests/cuda -q -p no:cacheprovider -rfE)
    [[ -n $sel ]] && args+=(-k "$sel")
    ROTORQ_PARITY_REPORT="$OUT/parity.json" timeout "${TEST_TIMEOUT:-300}" \
        python3 -m pytest "${args[@]}" > "$OUT/tests.txt" 2>&1
    echo "tests rc=$?" >> "$OUT/tests.txt"
    tail -25 "$OUT/tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
    timeout "${BENCH_TIMEOUT:-240}" python3 -m benchmarks.gpu.bench --out "$OUT" \
        --max-log2n "${MAX_LOG2N:-20}" > "$OUT/gpu_bench.log" 2>&1
    echo "gpu_bench rc=$?"
fi
if [[ $what == kv || $what == all ]]; then
    timeout "${KV_TIMEOUT:-180}" python3 -m benchmarks.gpu.kv_bench --out "$OUT" \
        > "$OUT/gpu_kv_bench.log" 2>&1
    echo "gpu_kv_bench rc=$?"
fi
if [[ $what == attend || $what == all ]]; then
    timeout "${ATTEND_TIMEOUT:-180}" python3 -m benchmarks.gpu.attend_breakdown --out "$OUT" \
        > "$OUT/attend_breakdown.log" 2>&1
    echo "attend_breakdown rc=$?"
fi
if [[ $what == shapes || $what == all ]]; then
    timeout "${SHAPES_TIMEOUT:-180}" python3 -m benchmarks.gpu.shapes --out "$OUT" \
        > "$OUT/gpu_shapes.log" 2>&1
    echo "gpu_shapes rc=$?"
fi
if [[ $what == tables || $what == all ]]; then
    timeout "${TABLES_TIMEOUT:-300}" python3 -m benchmarks.gpu.score_tables --out "$OUT" \
        > "$OUT/gpu_score_tables.log" 2>&1
    echo "gpu_score_tables rc=$?"
fi
if [[ $what == variants ]]; then
    timeout "${VARIANTS_TIMEOUT:-240}" python3 -m benchmarks.gpu.attention_variants --out "$OUT" \
        > "$OUT/gpu_attention_variants.log" 2>&1
    echo "gpu_attention_variants rc=$?"
fi
