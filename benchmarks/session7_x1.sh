#!/usr/bin/env bash
# One H100 (nvidia-h100-x1), Llama-3.1-8B shapes, random weights: batch-1 ITL A/B of the decode-row
# minimum (JAXLLM_DECODE_MIN_ROWS=2 vs 1), fp8 weight-only vs fp8-w8a8 with batch-1 decode FP8 x FP8
# (JAXLLM_FP8_MATMUL_MIN_TOKENS=1), then a profile of the fp8-w8a8 decode step at 256 rows.
#   PYTHONPATH=src OUT=/tmp/out bash benchmarks/session7_x1.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-s7
bench_latency bf16_rows1 -
bench_latency bf16_rows2 JAXLLM_DECODE_MIN_ROWS=2
bench_latency fp8 - --quantization fp8
bench_latency w8a8_m1 JAXLLM_FP8_MATMUL_MIN_TOKENS=1 --quantization fp8-w8a8
echo "== profile w8a8 b256" >&2
timeout ${PROFILE_TIMEOUT:-180} python benchmarks/profile_decode.py --model $M --batch 256 --quantization fp8-w8a8 --decode-steps 16 \
  --output-len 32 --top 30 --trace-dir /tmp/tr_w8a8 --hlo-dir /tmp/hlo_w8a8 > "$OUT/profile_w8a8_b256.txt" 2>&1 || echo "profile failed"
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<12} ITL p50 {1e3 * r['itl_s']['p50']:6.2f} ms  TTFT p50 {1e3 * r['ttft_s']['p50']:6.1f} ms")
t = (out / "profile_w8a8_b256.txt").read_text()
if "{" in t:
    print(t[: t.index("{")][-400:])
    j = json.loads(t[t.index("{"):])
    for k, v in list(j["device_us_by_kernel"].items())[:14]:
        print(f"{v:9.0f} us x{j['launches_by_kernel'][k]:5d} {k[:50]} :: {j.get('kernel_hlo', {}).get(k, '')[:80]}")
PY
