#!/usr/bin/env bash
# The default fp8 decode kernel (swap_ab + k_in_registers + lean_smem) against its forms with several
# KV heads a program, more stages or larger tiles, at the throughput shape (1024 sequences x 160 /
# 256 tokens, 16-token pages), on one GPU in one call; then, if a heads_per_program form is >= 3%
# faster over both contexts, 1000 x 128/128 at 1024 rows (benchmarks/tput_h100.sh) with it against
# the default, interleaved twice. Logs in $OUT (default /tmp/jaxllm-attn-hpp).
#   OUT=$OUT bash benchmarks/attention_hpp.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-hpp
start=$SECONDS
kl="swap_ab=True,k_in_registers=True,lean_smem=True"
forms="$kl,heads_per_program=4;$kl,heads_per_program=8;$kl,max_concurrent_steps=3;$kl,block_kv=128"
forms="$forms;$kl,heads_per_program=2,max_concurrent_steps=3;$kl,heads_per_program=4,max_concurrent_steps=3"
kernel_b1024 --variants "=mosaic fp8 swap_ab=True;mosaic fp8 swap_ab=True,k_in_registers=True,lean_smem=True" \
  --mosaic-fp8 "$forms"
echo "kernel part done at $((SECONDS - start)) s"
# forms the runner can switch to: heads_per_program alone (JAXLLM_ATTN_HEADS_PER_PROGRAM)
best=$(python "$(dirname "$0")/kernel_pick.py" "$OUT/kernel_b1024.txt" --base "mosaic fp8 $kl" \
  --match "mosaic fp8 $kl,heads_per_program=[0-9]+" --at-most 0.97)
hpp=${best:+${best##*=}}
echo "heads_per_program worth a throughput run: ${hpp:-none}"
[ -n "$hpp" ] || exit 0
sw="JAXLLM_ATTN_HEADS_PER_PROGRAM=$hpp"
OUT=$OUT/tput LIMIT=$(( ${LIMIT:-560} - (SECONDS - start) )) VARIANTS="default hpp$hpp:$sw default hpp$hpp:$sw" \
  bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -6
