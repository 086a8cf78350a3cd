#!/usr/bin/env bash
# The Triton decode kernel over fp8 pools with K and / or V converted by integer operations on their
# bits (fp8_bits) against its plain fp8 upcast and the Mosaic kernel's default fp8 form, at the
# throughput shape (1024 sequences x 160 / 256 tokens, 16-token pages); then, if the fastest
# fp8_bits tiling beats the Mosaic default by >= 5% over both contexts, 1000 x 128/128 at 1024 rows
# (benchmarks/tput_h100.sh) with it against the default, interleaved; then the Triton kernel's GPU
# tests with what time is left. Logs in $OUT (default /tmp/jaxllm-attn-bits).
#   OUT=$OUT bash benchmarks/attention_fp8_bits.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-bits
start=$SECONDS
kl="swap_ab=True,k_in_registers=True,lean_smem=True"
tilings=${TILINGS:-64/2/2,64/2/2/h,64/2/2/hv,64/2/2/hk,64/2/2/hkv,64/4/2/hkv,32/2/2/hkv,128/4/2/hkv,64/2/3/hkv}
timeout ${KERNEL_TIMEOUT:-240} python benchmarks/decode_kernel.py --batch 1024 --contexts 160,256 --block-size 16 \
  --iters 20 --variants "=mosaic fp8 $kl;triton fp8" --triton "$tilings" \
  > "$OUT/kernel_b1024.txt" 2>&1 || echo "kernel_b1024 rc=$?"
grep -v '^{' "$OUT/kernel_b1024.txt" | tail -22
echo "kernel part done at $((SECONDS - start)) s"
best=$(python - "$OUT/kernel_b1024.txt" "mosaic fp8 $kl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
total = {}
for r in rows:
    if "us" in r and r["rel_err"] < 2e-2:
        total.setdefault(r["variant"], []).append(r["us"])
total = {k: sum(v) for k, v in total.items() if len(v) == 2}
base = total.get(sys.argv[2])
cands = {k: v for k, v in total.items() if k.startswith("triton fp8 ") and any(c in k.split("/")[-1] for c in "kv")}
best = min(cands, key=cands.get) if cands else None
print(best.split()[-1] if base and best and cands[best] <= 0.95 * base else "")
PY
)
echo "fp8_bits tiling worth a throughput run: ${best:-none}"
if [ -n "$best" ]; then
  IFS=/ read -r bkv nw ns flags <<< "$best"
  bits=$(tr -cd kv <<< "$flags"); hf=0; [[ $flags == *h* ]] && hf=1
  sw="JAXLLM_ATTN_TRITON=1,JAXLLM_ATTN_TRITON_TILING=$bkv/$nw/$ns,JAXLLM_ATTN_TRITON_FP8_BITS=$bits,JAXLLM_ATTN_HEADS_FASTEST=$hf"
  OUT=$OUT/tput LIMIT=$(( ${LIMIT:-480} - (SECONDS - start) )) VARIANTS="default bits:$sw default bits:$sw" \
    bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -6
fi
left=$(( ${LIMIT:-480} + 60 - (SECONDS - start) ))
[ $left -gt 60 ] && timeout $left python -m pytest -q -m gpu tests/test_pallas_decode_triton.py 2>&1 | tail -4
