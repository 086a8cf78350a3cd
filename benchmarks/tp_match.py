"""Greedy tokens at several tensor-parallel sizes against tp=1, on random weights of a model's shapes.

    python benchmarks/tp_match.py --model .models/llama-3.1-8b-shapes --tp 1 2 [--prompts 8 --max-tokens 64]

Each tp runs in a fresh process (LLM(load_format="dummy"): the same random weights for every tp,
jax's partitionable threefry makes them independent of the sharding); the script prints, per tp,
how many sequences equal tp=1's token for token and the first position where any differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
from jaxllm import LLM, SamplingParams
model, tp, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
prompts = [{"prompt_token_ids": rng.integers(100, 30000, int(rng.integers(8, 160))).tolist()} for _ in range(n)]
with LLM(model, load_format="dummy", dtype="bfloat16", tensor_parallel_size=tp, max_seq_len=512,
         max_batch_size=n) as llm:
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def run(model, tp, n, max_tokens):
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(tp), str(n), str(max_tokens)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"tp={tp} failed:\n{out.stderr[-3000:]}")
    return json.loads([l for l in out.stdout.splitlines() if l.startswith("TOKENS")][-1][len("TOKENS "):])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="prompts are 8..160 tokens; max_seq_len is 512")
    args = ap.parse_args()
    base = run(args.model, 1, args.prompts, args.max_tokens)
    print(f"{'tp':>3} {'sequences equal to tp=1':>24} {'first difference (seq, pos)':>28}")
    ok = True
    for tp in [t for t in args.tp if t != 1]:
        toks = run(args.model, tp, args.prompts, args.max_tokens)
        equal = sum(a == b for a, b in zip(base, toks))
        first = next(((i, next(j for j, (x, y) in enumerate(zip(a, b)) if x != y))
                      for i, (a, b) in enumerate(zip(base, toks)) if a != b), None)
        ok &= equal == len(base)
        print(f"{tp:>3} {f'{equal}/{len(base)}':>24} {str(first):>28}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
