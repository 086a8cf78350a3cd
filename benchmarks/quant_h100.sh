#!/usr/bin/env bash
# Issue 8 on one H100: FP8 / int8 weights and the FP8 KV cache at Llama-3.1-8B shapes (random
# weights), each against bf16 in the same run; the GPU suites of the kernels not yet run on a GPU
# (fp8 decode, the ragged prefill kernel: runner.UNVERIFIED_ON_GPU) and the prefill kernel's timings.
#   PYTHONPATH=src OUT=/tmp/out bash benchmarks/quant_h100.sh      (STEPS to pick: tests kernel prefill gemv latency throughput)
source "$(dirname "$0")/common.sh" /tmp/jaxllm-quant
STEPS=${STEPS:-tests kernel prefill latency throughput}
for s in $STEPS; do case $s in
tests)
  # $TESTS: the GPU suites to run (default: all of issue 4's and 8's; they took 6 min on 2026-11-26)
  timeout 500 python -m pytest -q -m gpu ${TESTS:-tests/test_pallas_decode.py tests/test_kv_fp8.py tests/test_pallas_prefill.py tests/test_quantization.py tests/test_fp8_gemv.py} \
    > "$OUT/gpu_tests.txt" 2>&1 \
    || { echo "gpu tests failed"; tail -15 "$OUT/gpu_tests.txt"; } ;;
kernel)
  timeout 300 python benchmarks/decode_kernel.py --contexts 2048,8192 --batch 64 > "$OUT/kernel.txt" 2>&1 \
    || { echo "kernel bench failed"; tail -5 "$OUT/kernel.txt"; } ;;
gemv)
  timeout 400 python benchmarks/fp8_gemv.py ${GEMV_ARGS:---sweep} > "$OUT/gemv.txt" 2>&1 || { echo "gemv bench failed"; tail -5 "$OUT/gemv.txt"; } ;;
prefill)
  timeout 300 python benchmarks/prefill_kernel.py --json "$OUT/prefill.json" > "$OUT/prefill.txt" 2>&1 \
    || { echo "prefill bench failed"; tail -5 "$OUT/prefill.txt"; } ;;
latency)
  common="--model $M --load-format dummy --dtype bfloat16 --max-batch-size 1 --max-seq-len ${MSL:-4096} --input-len 128 --output-len 128 --iterations 5"
  # name|quantization|KV cache|environment (fp8_gemv: the Pallas fp8 GEMV for decode, not yet the default)
  for v in "bf16|||" "fp8|--quantization fp8||" "fp8_gemv|--quantization fp8||JAXLLM_FP8_GEMV=1" \
           "int8|--quantization int8||" "fp8_kvfp8|--quantization fp8|--kv-cache-dtype fp8|" "w8a8|--quantization fp8-w8a8||"; do
    IFS='|' read -r name q kv envs <<< "$v"
    [[ " ${LATV:-$name} " == *" $name "* ]] || continue  # $LATV: the variants to run (default all)
    env $envs timeout 200 python -m jaxllm bench latency $common $q $kv --report-json "$OUT/lat_$name.json" > "$OUT/lat_$name.txt" 2>&1 \
      || { echo "latency $name failed"; tail -5 "$OUT/lat_$name.txt"; }
  done ;;
throughput)
  common="--model $M --load-format dummy --dtype bfloat16 --num-requests 1000 --input-len 128 --output-len 128 --max-batch-size 512 --max-seq-len 512"
  for v in "bf16||" "fp8|--quantization fp8|" "w8a8|--quantization fp8-w8a8|" "w8a8_kvfp8|--quantization fp8-w8a8|--kv-cache-dtype fp8"; do
    IFS='|' read -r name q kv <<< "$v"
    timeout 300 python -m jaxllm bench throughput $common $q $kv --report-json "$OUT/tp_$name.json" > "$OUT/tp_$name.txt" 2>&1 \
      || { echo "throughput $name failed"; tail -5 "$OUT/tp_$name.txt"; }
  done ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print((out / "gpus.txt").read_text())
for f in ("gpu_tests.txt", "kernel.txt", "prefill.txt", "gemv.txt"):
    if (out / f).exists():
        print("\n".join((out / f).read_text().splitlines()[-14:]))
print(f"{'run':<16} {'ITL p50 ms':>10} {'TTFT p50 ms':>11} {'out tok/s':>10} {'MBU':>5} {'weights GB':>10} {'KV B/tok':>8}")
for p in sorted(out.glob("lat_*.json")) + sorted(out.glob("tp_*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<16} {1e3*r['itl_s']['p50']:>10.2f} {1e3*r['ttft_s']['p50']:>11.1f} {r['output_tok_s']:>10.0f} "
          f"{100*(r['mbu'] or 0):>4.0f}% {r['weight_bytes']/1e9:>10.2f} {r['kv_bytes_per_token']:>8}")
PY
