#!/usr/bin/env bash
# Tensor parallel on 4 or 8 GPUs of one host (device kinds nvidia-h100-x4 / -x8; issue 9), random bf16
# weights. Shapes are derived from the Llama-3.1-8B shapes folder ($BASE): "8b", "8b-kv2" (2 KV heads:
# replicated over 4 devices), "70b" (Llama-3.1-70B: 80 layers, hidden 8192, 64 / 8 heads, intermediate
# 28672), "70b-kv4" (4 KV heads: replicated at tp=8). Steps ($STEPS):
#   match       tp_match.py: greedy tokens at tp=$TP vs tp=1, float32, the shapes in $MATCH (8b 8b-kv2)
#   allreduce   one small all-reduce over 2 and over all GPUs (the per-layer cost of tensor parallelism)
#   latency     jaxllm bench latency, batch 1, 128/128: variants in $LAT ("name model tp" separated by |)
#   throughput  jaxllm bench throughput 1000/1000, $NREQ requests, batch $NREQ: variants in $TPUT; every
#               greedy step program for 1000-token prompts and up to 2000 tokens ($PRECOMPILE; 27 programs
#               at batch 256) compiles first, 8 at a time (at 70B one program compiles for ~16 s, and the
#               warm-up alone compiled past a 540 s limit on 2026-11-26); the warm-up is $WARMUP (16)
#               requests, since precompile already compiled the batch-$NREQ programs
#   PYTHONPATH=src OUT=/tmp/out TP=4 STEPS="match latency" bash benchmarks/tp_large.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-tp
BASE=${BASE:-$M}
TP=${TP:-$(nvidia-smi -L | wc -l)}
# 192 x 2000 tokens of 70B KV (82 KB per token per device at tp=4) fit beside 35 GB of weights on an
# 80 GB H100; 256 would preempt there
NREQ=${NREQ:-192}
S=/tmp/jaxllm-shapes
python - "$BASE" "$S" <<'PY'
import json, pathlib, shutil, sys
base, root = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
big = dict(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, intermediate_size=28672)
for name, over in {"8b": {}, "8b-kv2": dict(num_key_value_heads=2), "70b": big,
                   "70b-kv4": dict(big, num_key_value_heads=4)}.items():
    d = root / name
    shutil.copytree(base, d, dirs_exist_ok=True)
    cfg = json.loads((base / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **over}, indent=1))
PY
# bench_each MODE PREFIX TIMEOUT "name shapes tp|..." ARGS...: one jaxllm bench run per variant
bench_each() {
  local mode=$1 prefix=$2 limit=$3 v; local -a variants; IFS='|' read -ra variants <<< "$4"; shift 4
  for v in "${variants[@]}"; do
    set -- $v "$@"
    echo "== $mode $1" >&2
    timeout $limit python -m jaxllm bench $mode --model $S/$2 --load-format dummy --dtype bfloat16 \
      --tensor-parallel-size $3 "${@:4}" --report-json "$OUT/${prefix}_$1.json" > "$OUT/${prefix}_$1.txt" 2>&1 \
      || { echo "$mode $1 failed"; tail -5 "$OUT/${prefix}_$1.txt"; }
    shift 3
  done
}
STEPS=${STEPS:-match allreduce latency throughput}
for s in $STEPS; do case $s in
match)
  for m in ${MATCH:-8b 8b-kv2}; do
    echo "== tp match $m" | tee -a "$OUT/tp_match.txt" >&2
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout 500 python benchmarks/tp_match.py --model $S/$m --tp 1 $TP \
      --dtype float32 --prompts 8 --max-tokens 64 >> "$OUT/tp_match.txt" 2>&1 || echo "tp_match $m failed/differs"
  done ;;
allreduce)
  for devs in 0,1 all; do
    echo "== allreduce over GPUs $devs" | tee -a "$OUT/allreduce.txt" >&2
    ( [ $devs = all ] || export CUDA_VISIBLE_DEVICES=$devs
      timeout 120 python benchmarks/allreduce_latency.py --sizes 8192 16384 1048576 --iters 500 ) >> "$OUT/allreduce.txt" 2>&1 \
      || echo "allreduce $devs failed"
  done ;;
latency)
  LAT=${LAT:-"8b_tp1 8b 1|8b_tp2 8b 2|8b_tp$TP 8b $TP|70b_tp$TP 70b $TP"}
  bench_each latency lat 400 "$LAT" --max-batch-size 1 --max-seq-len 4096 --input-len 128 --output-len 128 --iterations 5 ;;
throughput)
  bench_each throughput tput ${TPUT_LIMIT:-560} "${TPUT:-"70b_tp$TP 70b $TP"}" --num-requests $NREQ --max-batch-size $NREQ \
    --warmup-requests ${WARMUP:-16} --input-len 1000 --output-len 1000 --max-seq-len 2048 --precompile-max-len ${PRECOMPILE:-2000} ;;
esac; done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print((out / "gpus.txt").read_text().splitlines()[1])
for f in ("tp_match.txt", "allreduce.txt"):
    if (out / f).exists():
        print("\n".join(l for l in (out / f).read_text().splitlines() if l.startswith(("==", " ", "all", "a div", "size", "psum")) or "us" in l)[-1500:])
print(f"{'run':<14} {'ITL p50 ms':>10} {'TTFT p50 ms':>11} {'out tok/s':>10} {'MBU':>5} {'startup s':>9} {'precompile':>14}")
for p in sorted(out.glob("lat_*.json")) + sorted(out.glob("tput_*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<14} {1e3*r['itl_s']['p50']:>10.2f} {1e3*r['ttft_s']['p50']:>11.1f} {r.get('output_tok_s') or 0:>10.0f} "
          f"{100*(r['mbu'] or 0):>4.0f}% {r.get('startup_to_first_token_s') or 0:>9.1f} "
          + (f"{pc['programs']:>4} in {pc['seconds']:>5.0f} s" if (pc := r.get('precompile')) else f"{'-':>14}"))
PY
