# Set-up shared by the device scripts; each sources it with its default log folder:
#   source "$(dirname "$0")/common.sh" /tmp/jaxllm-NAME
# Sets $M (the model folder: $MODEL, default the Llama-3.1-8B shapes) and $OUT (the log folder: $OUT,
# else the argument; created), a fresh persistent compilation cache unless $JAXLLM_CACHE_DIR names
# one, and writes the GPUs and their links into $OUT/gpus.txt.
set -u
M=${MODEL:-.models/llama-3.1-8b-shapes}
OUT=${OUT:-$1}
mkdir -p "$OUT"
export JAXLLM_CACHE_DIR=${JAXLLM_CACHE_DIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
# batch-1 latency of the model (128 in / 128 out), one named run: bench_latency NAME ENVS [ARGS...]
# (ENVS: "VAR=value ..." or -; ARGS: more `jaxllm bench latency` arguments); report in $OUT/NAME.json
bench_latency() {
  local name=$1 envs=$2; shift 2; [ "$envs" = "-" ] && envs=""
  echo "== $name" >&2
  env $envs timeout ${LAT_TIMEOUT:-100} python -m jaxllm bench latency --model "$M" --load-format dummy --dtype bfloat16 \
    --max-batch-size 1 --max-seq-len 4096 --input-len 128 --output-len 128 --iterations 5 "$@" \
    --report-json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.txt"; }
}
# the decode kernels at the throughput shape (1024 sequences x 160 / 256 tokens, 16-token pages), more
# benchmarks/decode_kernel.py arguments after: its log in $OUT/kernel_b1024.txt, its table printed
kernel_b1024() {
  timeout ${KERNEL_TIMEOUT:-240} python "$(dirname "${BASH_SOURCE[0]}")/decode_kernel.py" --batch 1024 --contexts 160,256 \
    --block-size 16 --iters 20 "$@" > "$OUT/kernel_b1024.txt" 2>&1 || echo "kernel_b1024 rc=$?"
  grep -v '^{' "$OUT/kernel_b1024.txt" | tail -24
}
