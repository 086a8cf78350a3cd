#!/usr/bin/env bash
# The decode kernels' grid order (heads_fastest: the KV heads, not the sequences, the grid's
# fastest-varying axis) at the throughput shape (1024 sequences x 160 / 256 tokens, 16-token pages):
# the Mosaic kernel's default fp8 form and its bf16 default, the Triton kernel (fp8 64/2/2, bf16
# 64/4/2), each with and without; then, if the Mosaic fp8 form is >= 2% faster over both contexts
# with it, 1000 x 128/128 at 1024 rows (benchmarks/tput_h100.sh) against the default, interleaved.
# Logs in $OUT (default /tmp/jaxllm-attn-grid).
#   OUT=$OUT bash benchmarks/attention_grid_order.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-grid
start=$SECONDS
kl="swap_ab=True,k_in_registers=True,lean_smem=True"
kernel_b1024 --variants "=mosaic fp8 $kl;=mosaic fp8 $kl,heads_fastest=True;=mosaic default;=mosaic heads_fastest=True;triton" \
  --mosaic-fp8 "$kl,heads_fastest=True" --triton "64/2/2,64/2/2/h,64/4/2,64/4/2/h"
echo "kernel part done at $((SECONDS - start)) s"
gain=$(python "$(dirname "$0")/kernel_pick.py" "$OUT/kernel_b1024.txt" --base "mosaic fp8 $kl" \
  --match "mosaic fp8 $kl,heads_fastest=True" --at-most 0.98)
echo "heads_fastest worth a throughput run: ${gain:-no}"
[ -n "$gain" ] || exit 0
sw="JAXLLM_ATTN_HEADS_FASTEST=1"
OUT=$OUT/tput LIMIT=$(( ${LIMIT:-560} - (SECONDS - start) )) VARIANTS="default hf:$sw default hf:$sw" \
  bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -6
