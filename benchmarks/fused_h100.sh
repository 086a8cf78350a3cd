#!/usr/bin/env bash
# Fused k/v and gate/up projections (commit 00de742) against the tree before them ($PRE, default
# .prefusion/src: `git archive e6ec554 src | tar -x -C .prefusion`), batch-1 latency and 1000 x 128/128
# throughput at Llama-3.1-8B shapes on one GPU, plus fp8 batch 1 and TTFT at 2048 with the fusion.
#   OUT=/tmp/out bash benchmarks/fused_h100.sh
export JAX_PLATFORMS=cuda,cpu
W=/tmp/w3; mkdir -p $W
M=${MODEL:-.models/llama-3.1-8b-shapes}
export JAXLLM_CACHE_DIR=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv > $W/gpus.txt
c="--model $M --load-format dummy --dtype bfloat16"
lat="$c --max-batch-size 1 --max-seq-len 4096 --input-len 128 --output-len 128 --iterations 5"
tput="$c --num-requests 1000 --input-len 128 --output-len 128 --max-batch-size 512 --max-seq-len 512"
run() { name=$1; src=$2; shift 2; echo "== $name" >&2; PYTHONPATH=$src timeout 170 python -m jaxllm bench "$@" --report-json $W/$name.json > $W/$name.txt 2>&1 || { echo "$name failed"; tail -3 $W/$name.txt; }; }
run lat_prefusion ${PRE:-.prefusion/src} latency $lat
run lat_fused src latency $lat
run lat_fused_fp8 src latency $lat --quantization fp8
run tput_prefusion ${PRE:-.prefusion/src} throughput $tput
run tput_fused src throughput $tput
run ttft2048_fused src latency $c --max-batch-size 1 --max-seq-len 4096 --input-len 2048 --output-len 2 --iterations 5
tar czf $OUT/logs.tgz -C $W .
python - $W <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1]); print(out.joinpath("gpus.txt").read_text())
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem:<16} ITL p50 {1e3*r['itl_s']['p50']:6.2f} ms  TTFT p50 {1e3*r['ttft_s']['p50']:7.1f} ms  out tok/s {r.get('output_tok_s') or 0:8.0f}  MBU {100*(r['mbu'] or 0):3.0f}%  MFU {100*(r.get('mfu') or 0):3.0f}%")
PY
