#!/usr/bin/env bash
# The Triton decode kernel with Q K^T as fp8 x fp8 products (fp8_qk: K unconverted, q split into two
# e4m3 parts) against its 16-bit form and the Mosaic kernel's default fp8 form at the throughput
# shape (1024 sequences x 160 / 256 tokens, 16-token pages); then, if the fastest fp8_qk tiling beats
# the Mosaic default by >= 3% over both contexts, 1000 x 128/128 at 1024 rows (benchmarks/tput_h100.sh)
# with it against the default, interleaved; then the Triton kernel's GPU tests with what time is
# left. Logs in $OUT (default /tmp/jaxllm-attn-qk).
#   OUT=$OUT bash benchmarks/attention_fp8_qk.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-qk
start=$SECONDS
kl="swap_ab=True,k_in_registers=True,lean_smem=True"
tilings=${TILINGS:-64/2/2,64/2/2/q,64/2/2/hq,64/4/2/q,32/2/2/q,128/4/2/q,64/4/3/q,64/8/2/q}
kernel_b1024 --variants "=mosaic fp8 $kl;triton fp8" --triton "$tilings"
echo "kernel part done at $((SECONDS - start)) s"
best=$(python "$(dirname "$0")/kernel_pick.py" "$OUT/kernel_b1024.txt" --base "mosaic fp8 $kl" \
  --match "triton fp8 [0-9]+/[0-9]+/[0-9]+/h?q" --at-most 0.97)
echo "fp8_qk tiling worth a throughput run: ${best:-none}"
if [ -n "$best" ]; then
  IFS=/ read -r bkv nw ns flags <<< "${best##* }"
  hf=0; [[ $flags == *h* ]] && hf=1
  sw="JAXLLM_ATTN_TRITON=1,JAXLLM_ATTN_TRITON_TILING=$bkv/$nw/$ns,JAXLLM_ATTN_TRITON_FP8_QK=1,JAXLLM_ATTN_HEADS_FASTEST=$hf"
  OUT=$OUT/tput LIMIT=$(( ${LIMIT:-480} - (SECONDS - start) )) VARIANTS="default qk:$sw default qk:$sw" \
    bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -6
fi
left=$(( ${LIMIT:-480} + 60 - (SECONDS - start) ))
[ $left -gt 60 ] && timeout $left python -m pytest -q -m gpu tests/test_pallas_decode_triton.py 2>&1 | tail -4
