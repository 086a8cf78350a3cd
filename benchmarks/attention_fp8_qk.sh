#!/usr/bin/env bash
# Q K^T as fp8 x fp8 products over fp8 pools (fp8_qk: K read unconverted, q split into two e4m3
# parts) in both decode kernels -- the Mosaic kernel's swap_ab form (with and without lean_smem) and
# the Triton kernel's tilings -- against the Mosaic kernel's default fp8 form, at the throughput
# shape (1024 sequences x 160 / 256 tokens, 16-token pages); then, if the fastest fp8_qk form beats
# the default by >= 3% over both contexts, 1000 x 128/128 at 1024 rows (benchmarks/tput_h100.sh) with
# it against the default, interleaved; then the decode kernels' fp8_qk GPU tests with what time is
# left. Logs in $OUT (default /tmp/jaxllm-attn-qk).
#   OUT=$OUT bash benchmarks/attention_fp8_qk.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attn-qk
start=$SECONDS
kl="swap_ab=True,k_in_registers=True,lean_smem=True"
qk="swap_ab=True,lean_smem=True,fp8_qk=True;swap_ab=True,fp8_qk=True;swap_ab=True,lean_smem=True,fp8_qk=True,max_concurrent_steps=3"
tilings=${TILINGS:-64/2/2,64/2/2/q,64/2/2/hq,64/4/2/q,32/2/2/q,128/4/2/q,64/4/3/q}
kernel_b1024 --variants "=mosaic fp8 $kl;fp8_qk=True;triton fp8" --mosaic-fp8 "$qk" --triton "$tilings"
echo "kernel part done at $((SECONDS - start)) s"
best=$(python "$(dirname "$0")/kernel_pick.py" "$OUT/kernel_b1024.txt" --base "mosaic fp8 $kl" \
  --match "mosaic fp8 swap_ab=True(,lean_smem=True)?,fp8_qk=True|triton fp8 [0-9]+/[0-9]+/[0-9]+/h?q" --at-most 0.97)
echo "fp8_qk form worth a throughput run: ${best:-none}"
if [[ $best == mosaic* ]]; then  # the runner's Mosaic form: lean_smem by default over fp8 pools
  sw="JAXLLM_ATTN_FP8_QK=1"; [[ $best == *lean_smem* ]] || sw="$sw,JAXLLM_ATTN_LEAN_SMEM=0"
elif [ -n "$best" ]; then
  IFS=/ read -r bkv nw ns flags <<< "${best##* }"
  hf=0; [[ $flags == *h* ]] && hf=1
  sw="JAXLLM_ATTN_TRITON=1,JAXLLM_ATTN_TRITON_TILING=$bkv/$nw/$ns,JAXLLM_ATTN_FP8_QK=1,JAXLLM_ATTN_HEADS_FASTEST=$hf"
fi
[ -n "$best" ] && OUT=$OUT/tput LIMIT=$(( ${LIMIT:-480} - (SECONDS - start) )) VARIANTS="default qk:$sw default qk:$sw" \
  bash "$(dirname "$0")/tput_h100.sh" 2>&1 | tail -6
left=$(( ${LIMIT:-480} + 60 - (SECONDS - start) ))
[ $left -gt 60 ] && timeout $left python -m pytest -q -m gpu tests/test_pallas_decode.py tests/test_pallas_decode_triton.py \
  -k "fp8_qk or fp8_forms_at_the_engine or heads_fastest" 2>&1 | tail -4
