#!/usr/bin/env bash
# tp=2 batch 1 on 2 GPUs (issue 5): a third of a per-shard step (JAXLLM_ROW_PARALLEL=psum, gemv small) is
# its 64 all-reduces at ~23 us each (BENCHMARKS.md "Ninth session"). STEPS:
#   latency  ITL of tp=2 per shard under each all-reduce: XLA's Triton one-shot kernel (default), NCCL
#            (--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE), NCCL with symmetric buffers,
#            the Pallas one-shot (JAXLLM_ROW_PARALLEL=oneshot); and XLA's partitioner (the default) with NCCL
#   ref      tp_match.py --reference float32: tp=1 default, tp=2 partitioner and tp=2 per shard against exact
#            arithmetic on the same random weights (which variant is nearer the truth)
#   profile  the per-shard decode on GPU $GPU (default 1; GPU 0's is in the eighth session's logs), XLA_FLAGS=$PFLAGS
#            (the profiler turns command buffers off: PFLAGS=--xla_enable_command_buffers_during_profiling=true
#            keeps them, so the kernels and gaps are those of a real step; TIMELINE=N lists N
#            consecutive kernels from mid-trace with the gaps between them, TIMELINE_FROM=MemcpyD2H from a step's end)
#   symm     ITL of the default (per shard since the ninth session) without / with NCCL symmetric buffers,
#            and with q and k/v fused (JAXLLM_FUSED_QKV=1)
#   graphs   ITL with NCCL symmetric buffers and fused q/k/v, and then the collectives in command buffers
#            (+COLLECTIVES: without, a step's graph is cut at each NCCL call) and/or synchronous all-reduces
#   defaults ITL of tp=2 under jaxllm's defaults (since the ninth session: per shard, fused q/k/v, NCCL
#            symmetric all-reduces), twice, and tp=1 in the same call
#   norm     ITL of tp=2 without / with the fused residual add + RMSNorm (JAXLLM_FUSED_NORM=1), then also
#            the shard's down projection through gemv (JAXLLM_GEMV_SMALL_MAX=7168*4096), and the float32 match
#   down     ITL of tp=2 under the defaults (fused norm since the tenth session) and with the shard's down
#            projection through gemv, silu(gate) * up computed in it (JAXLLM_GEMV_SMALL_MAX=7168*4096)
#   loop     ITL of tp=2 and tp=1 with the decode steps in a while loop (the default) and in a loop of fixed
#            trip count (JAXLLM_DECODE_LOOP=fixed: no host read of the predicate per step), and tp=2
#            fixed with the down projection through gemv
#   cbuf     ITL of tp=2 with the fixed loop, and with collectives (+COLLECTIVES) and/or while loops (+WHILE) in
#            XLA's command buffers (the timeline showed ~2-3.5 us idle on each side of every all-reduce, where
#            a step's command buffer is cut); the thunk sequences of the decode programs in $OUT/thunks_*
#   every    interleaved A/B of tp=2: the defaults, the fixed loop with collectives in command buffers, a done
#            check every 4 steps (JAXLLM_DECODE_LOOP=4) with them; defaults and fixed again (run-to-run spread)
#   fixed    the defaults against JAXLLM_DECODE_LOOP=fixed, whose decode programs (only) record the collectives
#            into command buffers since the tenth session (TTFT should stay the defaults'), interleaved, and the
#            defaults a third time
#   f32      tp_match.py --dtype float32 at JAX_DEFAULT_MATMUL_PRECISION=highest: tp=2 under the default = tp=1
#   tests    tests/test_gemv.py -m gpu (the kernel compiled against its reference)
#   PYTHONPATH=src OUT=/tmp/out STEPS="latency ref profile" bash benchmarks/tp2_allreduce.sh   # nvidia-h100-x2
source "$(dirname "$0")/common.sh" /tmp/jaxllm-tp2-allreduce
STEPS=${STEPS:-latency ref profile}
SHARD="JAXLLM_ROW_PARALLEL=psum JAXLLM_GEMV=small"
NCCL="--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE"
SYMM="$NCCL --xla_gpu_experimental_enable_nccl_symmetric_buffers=true"
for s in $STEPS; do case $s in
latency) bench_latency tp2_shard "$SHARD" --tensor-parallel-size 2
         (export XLA_FLAGS="$NCCL"; bench_latency tp2_shard_nccl "$SHARD" --tensor-parallel-size 2)
         (export XLA_FLAGS="$NCCL --xla_gpu_experimental_enable_nccl_symmetric_buffers=true"
          bench_latency tp2_shard_nccl_symm "$SHARD" --tensor-parallel-size 2)
         bench_latency tp2_shard_oneshot "JAXLLM_ROW_PARALLEL=oneshot JAXLLM_GEMV=small" --tensor-parallel-size 2
         (export XLA_FLAGS="$NCCL"; bench_latency tp2_xla_nccl - --tensor-parallel-size 2)
         bench_latency tp2_xla - --tensor-parallel-size 2 ;;
ref) timeout ${REF_TIMEOUT:-240} python benchmarks/tp_match.py --model "$M" --prompts 4 --max-tokens 32 --tp 2 \
       --reference float32 --env "" --env JAXLLM_ROW_PARALLEL=psum,JAXLLM_GEMV=small > "$OUT/ref.txt" 2>&1; tail -6 "$OUT/ref.txt" ;;
profile) XLA_FLAGS="${PFLAGS:-}" env $SHARD timeout 120 python benchmarks/profile_decode.py --model "$M" --tp 2 \
           --device-pattern /device:GPU:${GPU:-1} --top 60 --output-len 32 --timeline ${TIMELINE:-0} \
           --timeline-from "${TIMELINE_FROM:-}" \
           > "$OUT/profile_gpu${GPU:-1}.txt" 2>&1
         sed -n '/device_us_by_kernel/,/}/p' "$OUT/profile_gpu${GPU:-1}.txt" | head -14 ;;
symm) bench_latency tp2 - --tensor-parallel-size 2
      (export XLA_FLAGS="$SYMM"; bench_latency tp2_symm - --tensor-parallel-size 2
       bench_latency tp2_symm_qkv JAXLLM_FUSED_QKV=1 --tensor-parallel-size 2) ;;
graphs) for v in "symm_qkv|" "symm_qkv_graphs|--xla_gpu_enable_command_buffer=+COLLECTIVES" \
           "symm_qkv_graphs_sync|--xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_disable_async_collectives=ALLREDUCE" \
           "symm_qkv_sync|--xla_gpu_disable_async_collectives=ALLREDUCE"; do
          (export XLA_FLAGS="$SYMM ${v#*|}"; bench_latency "tp2_${v%%|*}" JAXLLM_FUSED_QKV=1 --tensor-parallel-size 2); done ;;
defaults) bench_latency tp2_defaults - --tensor-parallel-size 2; bench_latency tp2_defaults_again - --tensor-parallel-size 2
          bench_latency tp1_defaults - ;;
norm) bench_latency tp2_defaults - --tensor-parallel-size 2; bench_latency tp2_fused_norm JAXLLM_FUSED_NORM=1 --tensor-parallel-size 2
      bench_latency tp2_fused_norm_down "JAXLLM_FUSED_NORM=1 JAXLLM_GEMV_SMALL_MAX=29360128" --tensor-parallel-size 2
      JAXLLM_FUSED_NORM=1 JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${F32_TIMEOUT:-200} python benchmarks/tp_match.py \
        --model "$M" --prompts 4 --max-tokens 32 --tp 2 --dtype float32 > "$OUT/f32_fused_norm.txt" 2>&1; tail -3 "$OUT/f32_fused_norm.txt" ;;
down) bench_latency tp2_defaults - --tensor-parallel-size 2
      bench_latency tp2_down_gemv JAXLLM_GEMV_SMALL_MAX=29360128 --tensor-parallel-size 2 ;;
loop) bench_latency tp2_defaults - --tensor-parallel-size 2
      bench_latency tp2_fixed JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2
      bench_latency tp2_fixed_down "JAXLLM_DECODE_LOOP=fixed JAXLLM_GEMV_SMALL_MAX=29360128" --tensor-parallel-size 2
      bench_latency tp1_defaults -; bench_latency tp1_fixed JAXLLM_DECODE_LOOP=fixed ;;
cbuf) for v in "fixed|" "fixed_coll|+COLLECTIVES" "fixed_coll_while|+COLLECTIVES,+WHILE" "fixed_while|+WHILE"; do
        n=${v%%|*}; c=${v#*|}; d=$(mktemp -d)
        (export XLA_FLAGS="${c:+--xla_gpu_enable_command_buffer=$c} --xla_dump_to=$d --xla_dump_hlo_module_re=.*decode_impl.*"
         bench_latency tp2_$n JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2)
        mkdir -p "$OUT/thunks_$n"; cp $d/*thunk_sequence_after_thunk_passes.txt "$OUT/thunks_$n/" 2>/dev/null; done ;;
every) COLL=--xla_gpu_enable_command_buffer=+COLLECTIVES
       bench_latency tp2_defaults - --tensor-parallel-size 2
       (export XLA_FLAGS=$COLL; bench_latency tp2_fixed_coll JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2
        bench_latency tp2_every4_coll JAXLLM_DECODE_LOOP=4 --tensor-parallel-size 2)
       bench_latency tp2_defaults_again - --tensor-parallel-size 2
       (export XLA_FLAGS=$COLL; bench_latency tp2_fixed_coll_again JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2) ;;
fixed) bench_latency tp2_defaults - --tensor-parallel-size 2; bench_latency tp2_fixed JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2
       bench_latency tp2_defaults_again - --tensor-parallel-size 2
       bench_latency tp2_fixed_again JAXLLM_DECODE_LOOP=fixed --tensor-parallel-size 2
       bench_latency tp2_defaults_third - --tensor-parallel-size 2 ;;
f32) JAX_DEFAULT_MATMUL_PRECISION=highest timeout ${F32_TIMEOUT:-200} python benchmarks/tp_match.py --model "$M" \
       --prompts 4 --max-tokens 32 --tp 2 --dtype float32 > "$OUT/f32.txt" 2>&1; tail -3 "$OUT/f32.txt" ;;
tests) timeout ${TESTS_TIMEOUT:-150} python -m pytest -q -m gpu tests/test_gemv.py > "$OUT/tests.txt" 2>&1; tail -2 "$OUT/tests.txt" ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<20} ITL p50 {1e3 * r['itl_s']['p50']:6.2f} ms  TTFT p50 {1e3 * r['ttft_s']['p50']:6.1f} ms")
PY
