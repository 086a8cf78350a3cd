#!/usr/bin/env bash
# pallas.gemv on the GPU: its tilings against XLA's dot at Llama-3.1-8B shapes (benchmarks/gemv.py),
# then batch-1 ITL: bf16, and fp8 / int8 weight-only with XLA's dot (JAXLLM_GEMV=0) and with the
# default (auto: one-byte weights at one row through gemv), same call; a profile of fp8's decode.
# On 2 GPUs (STEPS=tp2) the tp=2 A/B instead: XLA's partitioner, every projection per shard in
# shard_map (JAXLLM_ROW_PARALLEL=psum) with XLA's dot, through gemv (JAXLLM_GEMV=1), and only the
# q/k/v and output projections through it (JAXLLM_GEMV=small).
# STEPS: tests (the kernel compiled vs its reference, tests/test_gemv.py -m gpu), kernel, latency,
# profile, tp2, match (tp_match.py: gemv vs XLA at tp=1; on 2 GPUs tp=2 psum without / with gemv),
# fp8qkv (fp8 batch 1 with q and k/v as one gemv, JAXLLM_FUSED_QKV=1, against the default),
# norm (bf16 and fp8 batch 1 without / with the fused residual add + RMSNorm, JAXLLM_FUSED_NORM=1),
# defaults (bf16, fp8, fp8 with JAXLLM_DECODE_LOOP=fixed, and with fused q/k/v too),
# tilings (fp8 batch 1 with other gemv tilings forced per weight shape, JAXLLM_GEMV_TILING),
# timeline (a real fp8 decode step's kernels and the gaps between them), kvab (the k/v tiling
# A/B, interleaved twice), w8a8 (a profile of 256-row fp8-w8a8 decode), silu (pallas.silu_mul_quant's
# GPU tests and timing alone; fp8 batch 1 with fused q/k/v (the default) and apart).
#   PYTHONPATH=src OUT=/tmp/out STEPS="tests kernel latency profile" bash benchmarks/gemv_h100.sh   # nvidia-h100-x1
#   PYTHONPATH=src OUT=/tmp/out STEPS="kernel tp2" bash benchmarks/gemv_h100.sh             # nvidia-h100-x2
source "$(dirname "$0")/common.sh" /tmp/jaxllm-gemv
STEPS=${STEPS:-tests kernel latency}
for s in $STEPS; do case $s in
tests) timeout ${TESTS_TIMEOUT:-200} python -m pytest -q -m gpu ${TESTS:-tests/test_gemv.py} > "$OUT/tests.txt" 2>&1; tail -2 "$OUT/tests.txt" ;;
kernel) timeout ${KERNEL_TIMEOUT:-240} python benchmarks/gemv.py --shapes ${SHAPES:-tp2 fp8 int8} > "$OUT/gemv.txt" 2>&1 || echo "gemv.py failed"
        sed -n '/best per shape/,$p' "$OUT/gemv.txt" ;;
latency) bench_latency bf16 JAXLLM_GEMV=0
         for q in fp8 int8; do bench_latency ${q}_xla JAXLLM_GEMV=0 --quantization $q; bench_latency $q - --quantization $q; done ;;
fp8qkv) bench_latency fp8 - --quantization fp8; bench_latency fp8_qkv JAXLLM_FUSED_QKV=1 --quantization fp8 ;;
defaults) # bf16 and fp8 batch 1 under the tenth session's defaults (fused norm; fp8's down projection
          # computing silu(gate) * up in gemv), fp8 with the fixed decode loop, and with fused q/k/v too
          bench_latency bf16 -; bench_latency fp8 - --quantization fp8
          bench_latency fp8_fixed JAXLLM_DECODE_LOOP=fixed --quantization fp8
          bench_latency fp8_fixed_qkv "JAXLLM_DECODE_LOOP=fixed JAXLLM_FUSED_QKV=1" --quantization fp8 ;;
norm) for q in bf16 fp8; do a=""; [ $q = fp8 ] && a="--quantization fp8"
        bench_latency $q - $a; bench_latency ${q}_fused_norm JAXLLM_FUSED_NORM=1 $a; done
      timeout 150 python -m pytest -q -m gpu tests/test_add_norm.py > "$OUT/tests_add_norm.txt" 2>&1; tail -1 "$OUT/tests_add_norm.txt" ;;
tilings) # fp8 batch 1 with the tilings benchmarks/gemv.py timed faster alone (eleventh session, H100) forced
         # in the model (JAXLLM_GEMV_TILING, per weight shape): k/v [4096 x 2048], q and o [4096 x 4096],
         # down [14336 x 4096] with 8 warps; the default before and after (run-to-run spread)
         T=JAXLLM_GEMV_TILING; KV="4096x2048=8,2048,1"; QO="4096x4096=32,512,1,8"
         bench_latency fp8 - --quantization fp8; bench_latency fp8_kv "$T=$KV" --quantization fp8
         bench_latency fp8_qo "$T=$QO" --quantization fp8; bench_latency fp8_kv_qo "$T=$KV;$QO" --quantization fp8
         bench_latency fp8_kv_qo16 "$T=$KV;4096x4096=16,512,1" --quantization fp8
         bench_latency fp8_down8 "$T=14336x4096=32,512,4,8" --quantization fp8
         bench_latency fp8_again - --quantization fp8 ;;
kvab) # the k/v tiling A/B again, interleaved (call 2 of the eleventh session: 4.05 vs 4.12 / 4.13 ms)
      T=JAXLLM_GEMV_TILING; KV="4096x2048=8,2048,1"
      bench_latency fp8 - --quantization fp8; bench_latency fp8_kv "$T=$KV" --quantization fp8
      bench_latency fp8_again - --quantization fp8; bench_latency fp8_kv_again "$T=$KV" --quantization fp8 ;;
w8a8) # where a 256-row fp8-w8a8 decode step's 14.9 ms go (sixth session; ~3 ms of FP8 FLOPs): a profile of
      # 256 requests of 128 + 32 tokens, the kernels named by the optimized HLO, a step's timeline
      timeout ${W8A8_TIMEOUT:-420} python benchmarks/profile_decode.py --model "$M" --quantization fp8-w8a8 \
        --batch 256 --decode-steps 16 --output-len 32 --top 40 --timeline 60 --timeline-from MemcpyD2H \
        --hlo-dir /tmp/hlo_w8a8 > "$OUT/profile_w8a8_b256.txt" 2>&1 || echo "w8a8 profile failed"
      mkdir -p "$OUT/thunks_w8a8"; cp /tmp/hlo_w8a8/*thunk_sequence_after_thunk_passes.txt "$OUT/thunks_w8a8/" 2>/dev/null
      head -3 "$OUT/profile_w8a8_b256.txt"; sed -n '/device_us_by_kernel/,/}/p' "$OUT/profile_w8a8_b256.txt" | head -30 ;;
silu) # pallas.silu_mul_quant (fp8-w8a8's MLP middle, opt-in JAXLLM_FUSED_SILU_QUANT) compiled against its
      # reference, and timed alone against XLA's path; fp8 batch 1 under the new default (fused q/k/v for
      # fp8 on one GPU) and with q and k/v apart (JAXLLM_FUSED_QKV=0)
      timeout 150 python -m pytest -q -m gpu tests/test_silu_mul_quant.py > "$OUT/tests_silu.txt" 2>&1; tail -1 "$OUT/tests_silu.txt"
      timeout 120 python benchmarks/silu_mul_quant.py > "$OUT/silu_mul_quant.txt" 2>&1; cat "$OUT/silu_mul_quant.txt" | tail -4
      bench_latency fp8 - --quantization fp8; bench_latency fp8_qkv_apart JAXLLM_FUSED_QKV=0 --quantization fp8 ;;
timeline) # a real fp8 decode step's kernels and gaps (command buffers kept while profiling)
         XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true timeout 120 python benchmarks/profile_decode.py \
           --model "$M" --quantization fp8 --top 40 --output-len 32 --timeline ${TIMELINE:-90} \
           --timeline-from "${TIMELINE_FROM:-}" > "$OUT/timeline_fp8.txt" 2>&1
         sed -n '/"timeline"/,/]/p' "$OUT/timeline_fp8.txt" | head -100 ;;
profile) timeout 90 python benchmarks/profile_decode.py --model "$M" --quantization fp8 --top 25 > "$OUT/profile_fp8.txt" 2>&1
         sed -n '/device_us_by_kernel/,/}/p' "$OUT/profile_fp8.txt" | head -16 ;;
tp2) bench_latency tp2 - --tensor-parallel-size 2; bench_latency tp2_psum "JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=0" --tensor-parallel-size 2
     bench_latency tp2_gemv "JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=1" --tensor-parallel-size 2
     bench_latency tp2_small "JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=small" --tensor-parallel-size 2 ;;
match) # the psum mismatch (BENCHMARKS.md "Eighth session"): kernel or layout? gemv against XLA at tp=1,
       # then tp=2 per shard without and with gemv, each against tp=1 under the defaults
       m="python benchmarks/tp_match.py --model $M --prompts 4 --max-tokens 32"
       timeout 150 $m --tp 1 --env JAXLLM_GEMV=small > "$OUT/match_tp1_gemv.txt" 2>&1; tail -2 "$OUT/match_tp1_gemv.txt"
       [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && for g in 0 small; do
         timeout 200 $m --tp 2 --env JAXLLM_ROW_PARALLEL=psum,JAXLLM_GEMV=$g > "$OUT/match_tp2_psum_$g.txt" 2>&1
         tail -2 "$OUT/match_tp2_psum_$g.txt"; done ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<10} ITL p50 {1e3 * r['itl_s']['p50']:6.2f} ms  TTFT p50 {1e3 * r['ttft_s']['p50']:6.1f} ms")
PY
