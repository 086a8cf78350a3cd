#!/usr/bin/env bash
# The decode kernel's variants on one GPU in one call: their gpu tests, then the kernel timed at the
# throughput shape (1024 sequences x 160 tokens, 16-token pages) and at batch 1, every variant
# against the default in the same run, and a region-by-region profile of the swap_ab programs with K
# staged and in registers. Logs in $OUT (default /tmp/jaxllm-attention).
#   OUT=$OUT/attn bash benchmarks/attention_h100.sh
# TESTS="-k swap" narrows the tests; VARIANTS overrides the kernel variants' name filter.
source "$(dirname "$0")/common.sh" /tmp/jaxllm-attention
timeout ${TEST_TIMEOUT:-240} python -m pytest -q -m gpu tests/test_pallas_decode.py \
  ${TESTS:--k "k_in_registers_on_gpu or swap_ab_on_gpu or fp8_kernel_matches"} \
  > "$OUT/tests.txt" 2>&1; echo "tests rc=$? ($(tail -1 "$OUT/tests.txt"))"
filter=${VARIANTS:-"mosaic fp8,mosaic default,mosaic swap"}
timeout ${KERNEL_TIMEOUT:-240} python benchmarks/decode_kernel.py --batch 1024 --contexts 160 --block-size 16 \
  --variants "$filter" > "$OUT/kernel_b1024.txt" 2>&1 || echo "kernel_b1024 rc=$?"
timeout ${KERNEL_TIMEOUT:-240} python benchmarks/decode_kernel.py --batch 1 --contexts 128,2048 --block-size 16 \
  --variants "$filter" > "$OUT/kernel_b1.txt" 2>&1 || echo "kernel_b1 rc=$?"
# where a program's time goes, region by region (Mosaic GPU's in-kernel profiler; a run of its own)
timeout ${KERNEL_TIMEOUT:-240} python benchmarks/decode_kernel.py --batch 1024 --contexts 160 --block-size 16 \
  --variants NONE --profile '{"swap_ab": true};{"swap_ab": true, "k_in_registers": true}' > "$OUT/profile_b1024.txt" 2>&1 \
  || echo "profile rc=$?"
grep -A12 "^profile" "$OUT/profile_b1024.txt" | head -45
for f in kernel_b1024 kernel_b1; do echo "== $f"; grep -v '^{' "$OUT/$f.txt" | grep -i "mosaic\|roofline\|variant" | tail -40; done
