#!/usr/bin/env bash
# Issue 8's throughput line on one H100: 1000 x 128/128 at 1024 rows, fp8-w8a8 weights and an fp8
# KV cache (Llama-3.1-8B shapes, random weights), variants interleaved in one call, then bf16.
# The persistent compilation cache (with XLA's FP8 GEMM autotune results) lives in build/jaxcache,
# which survives between calls on the same warm machine: the first run of a cold machine spends
# ~250-300 s in precompile (twelfth session), later ones 40-70 s. --kv-cache-free-gpu-memory-fraction
# 0.7: at the default 0.9 a cold precompile ran out of memory while autotuning (twelfth session).
#   OUT=/tmp/out VARIANTS="default heads2:JAXLLM_ATTN_HEADS_PER_PROGRAM=2 default" bash benchmarks/tput_h100.sh
# A variant is NAME[:VAR=value[,VAR=value][:ARGS]] (environment switches, or - for none; ARGS: its own
# bench arguments, commas for spaces, e.g. "mnt16k:-:--max-num-tokens,16384"); ARGS adds bench
# arguments to every run; BF16=1 appends the bf16 run (same shapes, bf16 KV).
# Each run gets what is left of LIMIT seconds (default 580) and is skipped under 60. A dry run on
# CPU: MODEL=(a small checkpoint) REQUESTS=8 ... (nvidia-smi missing is harmless).
# XLA's autotune results (the cache's xla_gpu_per_fusion_autotune_cache_dir: small text files) are
# most of a cold precompile; the call leaves them in $OUT/autotune_cache.tgz, and an archive kept in
# the repository at $AUTOTUNE (committed from an earlier call on the same GPU) seeds a fresh cache.
export JAXLLM_CACHE_DIR=${JAXLLM_CACHE_DIR:-$PWD/build/jaxcache}
mkdir -p "$JAXLLM_CACHE_DIR"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# the autotune results are per GPU model: an H200 gets its own archive (a cold H200 call leaves one)
[[ $gpu == *H200* ]] && card=h200 || card=h100
AUTOTUNE=${AUTOTUNE:-benchmarks/autotune/${card}_tput.tgz}
[ -f "$AUTOTUNE" ] && [ ! -d "$JAXLLM_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir" ] &&
  tar xzf "$AUTOTUNE" -C "$JAXLLM_CACHE_DIR" && echo "autotune cache seeded from $AUTOTUNE"
source "$(dirname "$0")/common.sh" /tmp/jaxllm-tput
start=$SECONDS
base="--model $M --load-format dummy --dtype bfloat16 --num-requests ${REQUESTS:-1000} --input-len 128 --output-len 128
      --max-batch-size 1024 --max-seq-len 512 --kv-cache-free-gpu-memory-fraction 0.7 ${ARGS:-}"
run() {  # name, "VAR=value ..." or "", bench arguments...
  local name=$1 envs=$2; shift 2
  local left=$(( ${LIMIT:-580} - (SECONDS - start) ))
  [ $left -lt 60 ] && { echo "$name skipped ($left s left)"; return; }
  env $envs timeout $left python -m jaxllm bench throughput $base "$@" --report-json "$OUT/$name.json" \
    > "$OUT/$name.txt" 2>&1 || { echo "$name failed"; grep -m3 "Error\|RESOURCE" "$OUT/$name.txt"; }
  echo "$name done at $((SECONDS - start)) s"
}
i=0
for v in ${VARIANTS:-default}; do
  i=$((i + 1)); name=${v%%:*}; rest=""; [[ $v == *:* ]] && rest=${v#*:}
  envs=${rest%%:*}; extra=""; [[ $rest == *:* ]] && extra=${rest#*:}
  [ "$envs" = "-" ] && envs=""
  run "$(printf %02d $i)_$name" "${envs//,/ }" --quantization fp8-w8a8 --kv-cache-dtype fp8 ${extra//,/ }
done
[ "${BF16:-0}" = 1 ] && run 99_bf16 ""
[ -d "$JAXLLM_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir" ] &&
  tar czf "$OUT/autotune_cache.tgz" -C "$JAXLLM_CACHE_DIR" xla_gpu_per_fusion_autotune_cache_dir
python - "$OUT" <<'PY'
import json, sys, pathlib
print(f"{'run':<22} {'out tok/s':>9} {'TPOT p50':>8} {'TTFT p50':>8} {'precomp':>7}  phases (s)")
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text()); ph = r["engine_phases"]
    top = " ".join(f"{k} {v['seconds']:.2f}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1]["seconds"])[:4])
    print(f"{p.stem:<22} {r['output_tok_s']:>9.0f} {1e3 * r['tpot_s']['p50']:>6.1f}ms {r['ttft_s']['p50']:>7.2f}s "
          f"{(r.get('precompile') or {}).get('seconds', 0):>6.0f}s  {top}  loops {r.get('decode_loops')}  "
          f"gc {r.get('timed_run_gc')}  mem {r.get('device_memory')}  gpu {r.get('timed_run_gpu_clocks')}")
PY
