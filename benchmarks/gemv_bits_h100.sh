#!/usr/bin/env bash
# One-row fp8 gemv: weight bytes converted by integer ops (JAXLLM_GEMV_CONVERT=bits) against the
# conversion instructions (the default), on one H100, one call:
#   1. the GPU tests (bits = cvt bit for bit at the models' tilings; tests/test_gemv.py -k bits);
#   2. benchmarks/gemv.py --set bits (fp8 shapes alone, 20 weights each so none stays in L2);
#   3. batch-1 ITL: fp8 default, bits, bits with the fastest tiling of step 2 per shape forced
#      (JAXLLM_GEMV_TILING), bits + the fp8 LM head, the default again, bf16.
#   PYTHONPATH=src OUT=/tmp/out bash benchmarks/gemv_bits_h100.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-gemv-bits
timeout ${TESTS_TIMEOUT:-100} python -m pytest -q -m gpu tests/test_gemv.py -k "bits" > "$OUT/tests.txt" 2>&1; tail -2 "$OUT/tests.txt"
timeout ${KERNEL_TIMEOUT:-180} python benchmarks/gemv.py --shapes fp8 --set bits --json "$OUT/gemv.json" > "$OUT/gemv.txt" 2>&1 || echo "gemv.py failed"
sed -n '/best per shape/,$p' "$OUT/gemv.txt"
TUNED=$(python - "$OUT/gemv.json" <<'PY'
import json, sys
try:
    rs = json.load(open(sys.argv[1]))
except Exception:
    rs = []
best = {}
for r in rs:
    if r.get("convert") == "bits" and (r["shape"] not in best or r["us"] < best[r["shape"]]["us"]):
        best[r["shape"]] = r
print(";".join(f"{r['k']}x{r['n']}={r['block_n']},{r['block_k']},{r['splits']},{r.get('num_warps', 4)},"
               f"{int(r.get('acc2d', False))}" for r in best.values() if "kv" != r["shape"].split()[-1]))
PY
)
echo "tuned tilings: $TUNED" | tee "$OUT/tuned.txt"
Q="--quantization fp8"
bench_latency fp8 - $Q
bench_latency bits JAXLLM_GEMV_CONVERT=bits $Q
[ -n "$TUNED" ] && bench_latency bits_tuned "JAXLLM_GEMV_CONVERT=bits JAXLLM_GEMV_TILING=$TUNED" $Q
bench_latency bits_head "JAXLLM_GEMV_CONVERT=bits JAXLLM_FP8_LM_HEAD=1" $Q
bench_latency fp8_again - $Q
bench_latency bf16 -
python - "$OUT" fp8 bits bits_tuned bits_head  fp8_again bf16 <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<12} {'ITL p50':>8} {'TTFT p50':>9}  decode calls by loop")
for name in sys.argv[2:]:
    p = out / f"{name}.json"
    if not p.exists():
        print(f"{name:<12} failed / not run"); continue
    d = json.loads(p.read_text())
    print(f"{name:<12} {1e3 * d['itl_s']['p50']:>6.2f}ms {1e3 * d['ttft_s']['p50']:>7.1f}ms  {d.get('decode_loops')}")
PY
