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
