#!/usr/bin/env bash
# The Triton decode kernel (pallas.decode_attention_triton) on one H100 in one call: its gpu tests,
# then its tilings timed against the Mosaic kernel's default (swap_ab) at the throughput shape (1024
# sequences x 160 / 256 tokens, 16-token pages, fp8 and bf16 pools), then 1000 x 128/128 at 1024 rows
# (benchmarks/tput_h100.sh) with the Mosaic kernel and with the Triton one at the fastest fp8 tiling
# at 160 tokens, interleaved. Logs in $OUT (default /tmp/jaxllm-attn-triton).
#   OUT=$OUT bash benchmarks/attention_triton_h100.sh
# TILINGS: the tilings to time (block_kv/num_warps/num_stages, commas); TPUT=0 skips the throughput
# runs; TPUT_VARIANTS overrides their order (TRITON in it is replaced by the picked tiling's switches).
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-triton
start=$SECONDS
timeout ${TEST_TIMEOUT:-150} python -m pytest -q -m gpu tests/test_pallas_decode_triton.py > "$OUT/tests.txt" 2>&1
echo "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
tilings=${TILINGS:-"32/4/2,64/4/2,64/4/3,64/8/2,128/4/2,128/8/2,128/8/3,64/2/2,32/2/3,128/4/1"}
timeout ${KERNEL_TIMEOUT:-200} python benchmarks/decode_kernel.py --batch 1024 --contexts 160,256 --block-size 16 \
  --variants "mosaic fp8 swap_ab=True,triton,mosaic default" --triton "$tilings" > "$OUT/kernel_b1024.txt" 2>&1 \
  || echo "kernel_b1024 rc=$?"
grep -v '^{' "$OUT/kernel_b1024.txt" | tail -40
echo "kernel part done at $((SECONDS - start)) s"
best=$(python - "$OUT/kernel_b1024.txt" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ok = [r for r in rows if r.get("ctx") == 160 and r["variant"].startswith("triton fp8") and "us" in r and r["rel_err"] < 2e-2]
print(min(ok, key=lambda r: r["us"])["variant"].split()[-1] if ok else "")
PY
)
echo "fastest fp8 tiling at 160 tokens: ${best:-none}"
[ "${TPUT:-1}" = 1 ] && [ -n "$best" ] || exit 0
sw="JAXLLM_ATTN_TRITON=1,JAXLLM_ATTN_TRITON_TILING=$best"
variants=${TPUT_VARIANTS:-"default triton:TRITON default triton:TRITON"}
OUT=$OUT/tput LIMIT=$(( ${LIMIT:-560} - (SECONDS - start) )) VARIANTS="${variants//TRITON/$sw}" \
  bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -8
