#!/usr/bin/env bash
# Batch-1 latency, TTFT and start-up on one GPU through `jaxllm bench latency` (Llama-3.1-8B shapes,
# random bf16 weights), with XLA command-buffer variants and HF transformers eager in the same run;
# VARIANTS "fused" times a synthetic decode step with fused q/k/v and gate/up matmuls against 7 per layer;
# "cublas" turns XLA's Triton GEMM fusions off (cuBLAS GEMMs); "profile" traces one batch-1 request (benchmarks/profile_decode.py) at 16 and 64 decode steps per call.
#   PYTHONPATH=src OUT=/tmp/out [VARIANTS="cold warm fused"] bash benchmarks/latency_h100.sh
source "$(dirname "$0")/common.sh" /tmp/jaxllm-latency
export JAXLLM_CACHE_DIR=$(mktemp -d)  # always an empty persistent compilation cache: the first run is cold
common="--model $M --load-format dummy --dtype bfloat16 --max-batch-size 1 --max-seq-len 4096"
run() {  # name, extra env, args...
  local name=$1 envs=$2; shift 2
  echo "== $name" >&2
  env $envs timeout 200 python -m jaxllm bench latency $common "$@" --report-json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
    || { echo "$name failed"; tail -5 "$OUT/$name.txt"; }
}
VARIANTS=${VARIANTS:-cold warm cmdbuf_while cmdbuf_off ttft2048}
for v in $VARIANTS; do
  case $v in
    cold|warm) run $v "" --input-len 128 --output-len 128 --iterations 5 ;;
    cmdbuf_while) run $v "XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
      --input-len 128 --output-len 128 --iterations 5 ;;
    cublas) run $v "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false" --input-len 128 --output-len 128 --iterations 5 ;;
    cmdbuf_off) run $v "XLA_FLAGS=--xla_gpu_enable_command_buffer=" --input-len 128 --output-len 128 --iterations 5 ;;
    ttft2048) run $v "" --input-len 2048 --output-len 2 --iterations 5 ;;
    profile)  # a profiler trace of one batch-1 request: GPU busy vs idle, host work in the gaps, engine phases
      for steps in 16 64; do
        timeout 240 python benchmarks/profile_decode.py --model "$M" --decode-steps $steps --trace-dir /tmp/trace_$steps --top 30 --hlo-dir /tmp/hlo_$steps \
          > "$OUT/profile_$steps.txt" 2>&1 || echo "profile $steps failed"
        grep -v "^\[" "$OUT/profile_$steps.txt" | tail -40
      done ;;
    fused)  # seven matmuls per layer vs four (q/k/v and gate/up fused) in a synthetic 8B decode step
      for layout in unrolled fused; do
        timeout 200 python benchmarks/decode_step_variants.py --variant $layout --batch 1 64 >> "$OUT/fused.txt" 2>&1 \
          || echo "decode_step_variants $layout failed"
      done
      grep '^{' "$OUT/fused.txt" ;;
  esac
done
timeout 150 python benchmarks/decode_baseline.py --model "$M" --batch-sizes 1 --backends hf --repeats 2 --timeout 140 \
  > "$OUT/hf_b1.txt" 2>&1
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<14} {'ITL ms p50':>10} {'TTFT ms p50':>11} {'MBU':>6} {'LLM() s':>8} {'to 1st tok s':>12}  breakdown")
for name in ("cold", "warm", "cmdbuf_while", "cmdbuf_off", "cublas", "ttft2048"):
    p = out / f"{name}.json"
    if not p.exists():
        print(f"{name:<14} (no report)"); continue
    r = json.loads(p.read_text())
    mbu = f"{100*r['mbu']:.0f}%" if r["mbu"] else "-"
    bd = " ".join(f"{k} {v:.1f}" for k, v in r.get("startup_breakdown_s", {}).items())
    print(f"{name:<14} {1e3*r['itl_s']['p50']:>10.2f} {1e3*r['ttft_s']['p50']:>11.1f} {mbu:>6} {r['load_s']:>8.1f} {r['startup_to_first_token_s']:>12.1f}  {bd}")
hf = [l for l in (out / "hf_b1.txt").read_text().splitlines() if l.startswith("hf-eager")]
print(hf[-1] if hf else "hf: no result")
PY
