#!/usr/bin/env bash
# Two GPUs of one host (device tool kind nvidia-h100-x2 / nvidia-h200-x2), Llama-3.1-8B shapes, random
# bf16 weights. Steps ($STEPS): match (tp_match.py: tp=2 greedy tokens vs tp=1), allreduce (latency of
# one small all-reduce, two collective implementations), latency (jaxllm bench latency, variants in
# $LAT), load (load_time.py: safetensors vs Orbax at tp 1 and 2), serving (jaxllm serve on GPU 0
# driven by jaxllm bench serving at two request rates).
#   PYTHONPATH=src OUT=/tmp/out STEPS="match latency" bash benchmarks/scaleout_h100x2.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-scaleout
STEPS=${STEPS:-match allreduce latency load serving}
for s in $STEPS; do case $s in
match)
  echo "== tp match" >&2
  timeout 400 python benchmarks/tp_match.py --model "$M" --tp 1 2 --prompts 8 --max-tokens 64 > "$OUT/tp_match.txt" 2>&1 \
    || { echo "tp_match failed/differs"; tail -5 "$OUT/tp_match.txt"; } ;;
allreduce)
  # variants: "name|env assignments" (XLA_FLAGS / NCCL_* / ...); NCCL_DEBUG=INFO shows the transport
  # (kernels: XLA's own collective kernels (Triton one-shot inside an NVLink domain) instead of NCCL;
  # sync: the all-reduce on the compute stream, no cross-stream events; graphs: collectives captured
  # in the command buffers too; one-queue: one hardware queue for all streams)
  AR=${AR:-"default|X=1;;one-shot|XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true;;nccl-LL|NCCL_PROTO=LL;;nccl-p2p-nvl|NCCL_P2P_LEVEL=NVL;;kernels|XLA_FLAGS=--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE;;sync|XLA_FLAGS=--xla_gpu_disable_async_collectives=ALLREDUCE;;graphs|XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES;;one-queue|CUDA_DEVICE_MAX_CONNECTIONS=1"}
  IFS=';;' read -ra ars <<< "$AR"
  for a in "${ars[@]}"; do
    [ -z "$a" ] && continue
    name=${a%%|*}; envs=${a#*|}
    echo "== allreduce $name ($envs)" | tee -a "$OUT/allreduce.txt" >&2
    env $envs timeout 120 python benchmarks/allreduce_latency.py >> "$OUT/allreduce.txt" 2>&1 || echo "allreduce $name failed"
  done
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P,SHM,NET,GRAPH timeout 120 python benchmarks/allreduce_latency.py --sizes 8192 --iters 50 \
    > "$OUT/nccl_debug.txt" 2>&1
  grep -E "via|Channel|NCCL version|P2P|SHM" "$OUT/nccl_debug.txt" | head -20 >> "$OUT/allreduce.txt" ;;
latency)
  common="--model $M --load-format dummy --dtype bfloat16 --max-batch-size 1 --max-seq-len 4096 --input-len 128 --output-len 128 --iterations 5"
  # name tp decode-steps attention-backend XLA_FLAGS [VAR=value,...] (e.g. JAXLLM_ROW_PARALLEL=oneshot)
  LAT=${LAT:-"tp1 1 16 auto -|tp2 2 16 auto -|tp2_oneshot 2 16 auto - JAXLLM_ROW_PARALLEL=oneshot|tp2_psum 2 16 auto - JAXLLM_ROW_PARALLEL=psum"}
  IFS='|' read -ra variants <<< "$LAT"
  for v in "${variants[@]}"; do
    set -- $v
    flags=$5; [ "$flags" = "-" ] && flags=""
    envs=${6:-}; envs=${envs//,/ }
    echo "== latency $1" >&2
    env $envs XLA_FLAGS="$flags" timeout ${LAT_TIMEOUT:-200} python -m jaxllm bench latency $common --tensor-parallel-size $2 --decode-steps $3 \
      --attention-backend $4 --report-json "$OUT/lat_$1.json" > "$OUT/lat_$1.txt" 2>&1 || { echo "latency $1 failed"; tail -5 "$OUT/lat_$1.txt"; }
  done ;;
load)
  echo "== load" >&2
  timeout 560 python benchmarks/load_time.py --shapes "$M" --workdir /tmp/lt --repeats 1 --tp 1 2 > "$OUT/load_time.txt" 2>&1 \
    || { echo "load_time failed"; grep -v "^    @" "$OUT/load_time.txt" | tail -20; } ;;
serving)
  echo "== serving" >&2
  PORT=8123
  # --precompile-max-len: every step program for requests up to 256 tokens compiles before serving
  # (greedy batches only: bench serving sends temperature 0), prompts past a cached prefix included
  CUDA_VISIBLE_DEVICES=0 python -m jaxllm serve "$M" --load-format dummy --dtype bfloat16 --port $PORT \
    --served-model-name llama8b --precompile-max-len ${PRECOMPILE:-256} --precompile-sampling greedy \
    > "$OUT/server.txt" 2>&1 &
  SPID=$!
  for i in $(seq 500); do curl -sf http://127.0.0.1:$PORT/health > /dev/null && break; sleep 1; done
  echo "server up after ${i} s" >> "$OUT/server.txt"
  b="python -m jaxllm bench serving --base-url http://127.0.0.1:$PORT --model llama8b --input-len 128 --output-len 128"
  # the programs are precompiled: a short warm-up only touches each once more. Each run draws its
  # own prompts (--seed): with one seed a run's prompts were the earlier run's, cached prefixes
  # (2026-11-26, H200), which is a different benchmark
  timeout 60 $b --num-prompts 32 --request-rate 8 --seed 1 > "$OUT/serve_warmup.txt" 2>&1
  timeout 100 $b --num-prompts 150 --request-rate 5 --seed 2 --report-json "$OUT/serve_rate5.json" > "$OUT/serve_rate5.txt" 2>&1
  timeout 100 $b --num-prompts 400 --request-rate 20 --seed 3 --report-json "$OUT/serve_rate20.json" > "$OUT/serve_rate20.txt" 2>&1
  curl -s http://127.0.0.1:$PORT/metrics > "$OUT/metrics.txt"
  kill -TERM $SPID; wait $SPID; echo "server exit $?" >> "$OUT/server.txt" ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print((out / "gpus.txt").read_text())
for f in ("allreduce.txt", "load_time.txt"):
    if (out / f).exists():
        print("\n".join(l for l in (out / f).read_text().splitlines() if not l.startswith("    @"))[-900:])
if (out / "tp_match.txt").exists():
    print((out / "tp_match.txt").read_text()[-600:])
print(f"{'latency run':<10} {'ITL ms p50':>10} {'TTFT ms p50':>11} {'MBU':>6}")
for p in sorted(out.glob("lat_*.json")):
    name = p.stem[4:]
    if True:
        r = json.loads(p.read_text())
        print(f"{name:<10} {1e3*r['itl_s']['p50']:>10.2f} {1e3*r['ttft_s']['p50']:>11.1f} {100*(r['mbu'] or 0):>5.0f}%")
for name in ("rate5", "rate20"):
    p = out / f"serve_{name}.txt"
    if p.exists():
        print(f"== serving {name}\n" + p.read_text()[-1200:])
PY
