#!/usr/bin/env bash
# A/B of two source trees in one call, same card: `jaxllm bench latency` (batch 1, 128 in / 128 out)
# and `jaxllm bench throughput` (1000 x 128/128; RUNS ttft: batch-1 TTFT of a 2048-token prompt, long: 1000 x 1000/1000, prefill_heavy: 1000 x
# 2048/128) at Llama-3.1-8B shapes, random bf16 weights.
#   OUT=/tmp/out TREES="base:.base/src new:src" RUNS="latency throughput" bash benchmarks/ab_h100.sh
# A tree is NAME:PATH of a `src` folder (e.g. `git archive REV src | tar -x -C .base`, carried to
# the device), optionally NAME:PATH:VAR=value for an environment switch, e.g.
# TREES="apart:src fused:src:JAXLLM_FUSED_QKV=1" (q and k/v as separate matmuls vs one). QUANT (e.g. "fp8 fp8-w8a8") adds throughput runs of the last tree with those
# quantization modes (QARGS: more arguments for them, e.g. "--kv-cache-dtype fp8", named by the suffix QTAG);
# BATCH sets throughput's --max-batch-size (default 256).
source "$(dirname "$0")/common.sh" /tmp/jaxllm-ab
TREES=${TREES:-new:src}
RUNS=${RUNS-latency throughput}  # RUNS="" runs none (only QUANT)
BATCH=${BATCH:-256}
ttft="--model $M --load-format dummy --dtype bfloat16 --max-batch-size 1 --max-seq-len 4096 --input-len 2048 --output-len 2 --iterations 5"
lat="--model $M --load-format dummy --dtype bfloat16 --max-batch-size 1 --max-seq-len 4096 --input-len 128 --output-len 128 --iterations 5"
long="--model $M --load-format dummy --dtype bfloat16 --num-requests 1000 --input-len 1000 --output-len 1000 --max-batch-size $BATCH --max-seq-len 2048"
prefill_heavy="--model $M --load-format dummy --dtype bfloat16 --num-requests 1000 --input-len 2048 --output-len 128 --max-batch-size $BATCH --max-seq-len 2304"
tput="--model $M --load-format dummy --dtype bfloat16 --num-requests 1000 --input-len 128 --output-len 128 --max-batch-size $BATCH --max-seq-len 512"
bench() {  # name, src path, kind, args...  ($envs: extra environment, VAR=value ...)
  local name=$1 src=$2 kind=$3; shift 3
  echo "== $name" >&2
  env ${envs:-} PYTHONPATH=$src timeout ${BENCH_TIMEOUT:-300} python -m jaxllm bench $kind "$@" --report-json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
    || { echo "$name failed"; tail -5 "$OUT/$name.txt"; }
}
last=""
for run in $RUNS; do
  for t in $TREES; do
    name=${t%%:*}; rest=${t#*:}; src=${rest%%:*}; last=$src
    envs=""; [[ $rest == *:* ]] && envs=${rest#*:}
    case $run in
      latency) bench "lat_$name" "$src" latency $lat ;;
      ttft) bench "ttft_$name" "$src" latency $ttft ;;  # TTFT of a 2048-token prompt
      throughput) bench "tput_$name" "$src" throughput $tput ;;
      long) bench "long_$name" "$src" throughput $long ;;  # 1000 x 1000/1000
      prefill_heavy) bench "ph_$name" "$src" throughput $prefill_heavy ;;  # 1000 x 2048/128
    esac
  done
done
envs=""
for q in ${QUANT:-}; do bench "tput_${q}${QTAG:-}" "${last:-src}" throughput $tput --quantization "$q" ${QARGS:-}; done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<18} {'ITL/TPOT p50 ms':>15} {'TTFT p50 ms':>11} {'out tok/s':>10} {'MFU':>5} {'compiles':>8}  phases (s)")
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    itl = r.get("itl_s") or r.get("tpot_s") or {}
    ph = r.get("engine_phases") or {}
    phs = " ".join(f"{k} {v['seconds']:.2f}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1]["seconds"])[:5])
    print(f"{p.stem:<18} {1e3*itl.get('p50', 0):>15.2f} {1e3*r['ttft_s']['p50']:>11.1f} {r['output_tok_s']:>10.0f} "
          f"{100*(r.get('mfu') or 0):>4.0f}% {(r.get('timed_run_compiles') or {}).get('programs', '-'):>8}  {phs}")
PY
