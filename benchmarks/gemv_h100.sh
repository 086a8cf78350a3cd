#!/usr/bin/env bash
# pallas.gemv on the GPU (built unmeasured in the seventh session): its tilings against XLA's dot at
# Llama-3.1-8B shapes (benchmarks/gemv.py), then batch-1 ITL with and without it (JAXLLM_GEMV=1) in
# bf16 and fp8 weight-only, same call. On 2 GPUs (STEPS=tp2) the tp=2 A/B instead: XLA's partitioner
# vs every projection per shard through gemv (JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=1); "_small" runs
# send only the q/k/v and output projections through it (JAXLLM_GEMV=small).
# STEPS: tests (the kernel compiled vs its reference, tests/test_gemv.py -m gpu), kernel, latency, tp2.
#   PYTHONPATH=src OUT=/tmp/out STEPS="tests kernel latency" bash benchmarks/gemv_h100.sh   # nvidia-h100-x1
#   PYTHONPATH=src OUT=/tmp/out STEPS="kernel tp2" bash benchmarks/gemv_h100.sh             # nvidia-h100-x2
source "$(dirname "$0")/common.sh" /tmp/jaxllm-gemv
STEPS=${STEPS:-tests kernel latency}
for s in $STEPS; do case $s in
tests) timeout 200 python -m pytest -q -m gpu tests/test_gemv.py > "$OUT/tests.txt" 2>&1; tail -2 "$OUT/tests.txt" ;;
kernel) timeout ${KERNEL_TIMEOUT:-240} python benchmarks/gemv.py --shapes ${SHAPES:-tp2 fp8} > "$OUT/gemv.txt" 2>&1 || echo "gemv.py failed"
        sed -n '/best per shape/,$p' "$OUT/gemv.txt" ;;
latency) for q in bf16 fp8; do a=; [ $q = fp8 ] && a="--quantization fp8"
           bench_latency $q - $a; bench_latency ${q}_gemv JAXLLM_GEMV=1 $a; bench_latency ${q}_small JAXLLM_GEMV=small $a; done ;;
tp2) bench_latency tp2 - --tensor-parallel-size 2; bench_latency tp2_psum JAXLLM_ROW_PARALLEL=psum --tensor-parallel-size 2
     bench_latency tp2_gemv "JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=1" --tensor-parallel-size 2
     bench_latency tp2_small "JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=small" --tensor-parallel-size 2 ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<10} ITL p50 {1e3 * r['itl_s']['p50']:6.2f} ms  TTFT p50 {1e3 * r['ttft_s']['p50']:6.1f} ms")
PY
