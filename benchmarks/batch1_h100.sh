#!/usr/bin/env bash
# Batch-1 latency A/B in one call on one card (128 in / 128 out, Llama-3.1-8B shapes, random
# weights, `jaxllm bench latency`), runs in the order given:
#   OUT=/tmp/out RUNS="fp8:-:--quantization,fp8 noswap:JAXLLM_ATTN_SWAP_AB=0:--quantization,fp8 bf16" \
#     bash benchmarks/batch1_h100.sh
# A run is NAME[:ENVS[:ARGS]]: ENVS "VAR=value,VAR=value" or -, ARGS bench arguments with commas for
# spaces. The logs come back as one archive, $OUT/batch1.tgz (the device tool returns few files);
# a table of ITL / TTFT p50 is printed last. LAT_TIMEOUT (default 100 s) bounds each run.
source "$(dirname "$0")/common.sh" /tmp/jaxllm-batch1
for r in ${RUNS:-fp8:-:--quantization,fp8}; do
  name=${r%%:*}; rest=""; [[ $r == *:* ]] && rest=${r#*:}
  envs=${rest%%:*}; args=""; [[ $rest == *:* ]] && args=${rest#*:}
  [ -z "$envs" ] && envs=-
  bench_latency "$name" "${envs//,/ }" ${args//,/ }
done
python - "$OUT" ${RUNS:-fp8} <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':<16} {'ITL p50':>8} {'TTFT p50':>9} {'startup':>8}  decode calls by loop")
for r in sys.argv[2:]:
    name = r.split(":")[0]; p = out / f"{name}.json"
    if not p.exists():
        print(f"{name:<16} failed"); continue
    d = json.loads(p.read_text())
    print(f"{name:<16} {1e3 * d['itl_s']['p50']:>6.2f}ms {1e3 * d['ttft_s']['p50']:>7.1f}ms "
          f"{d.get('startup_to_first_token_s') or 0:>7.0f}s  {d.get('decode_loops')}")
PY
tar czf /tmp/batch1.tgz -C "$OUT" . && rm -f "$OUT"/* && mv /tmp/batch1.tgz "$OUT/"
