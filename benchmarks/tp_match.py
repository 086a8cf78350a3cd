"""Greedy tokens at several tensor-parallel sizes against tp=1, on random weights of a model's shapes.

    python benchmarks/tp_match.py --model .models/llama-3.1-8b-shapes --tp 1 2 [--prompts 8 --max-tokens 64]

Each tp runs in a fresh process (LLM(load_format="dummy"): the same random weights for every tp,
jax's partitionable threefry makes them independent of the sharding). Greedy decoding of random
weights meets near-ties (two tokens whose logprobs differ in the last bf16 bits), and a different
summation order (an all-reduce of partial sums) may break such a tie the other way; from then on the
sequences differ. So the script reports, per tp: sequences equal to tp=1 token for token; the largest
difference of the chosen token's logprob while the two agree; and at each first divergence, tp=1's
margin (its top-1 minus top-2 logprob) there. A bug shows as large logprob differences or a
divergence at a clear margin; numerics show as small differences and divergences at near-ties only.
Exit status 0 when every divergence happened at a margin below --tie-margin. --env sets switches for
the compared runs only (so `--tp 1 --env JAXLLM_GEMV=small` compares a kernel against XLA at tp=1).
`--reference float32` compares every run (tp=1 under the defaults included) against exact arithmetic
instead: which of two bfloat16 variants is nearer the truth, not only whether they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
from jaxllm import LLM, SamplingParams
model, tp, n, max_tokens, backend, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
rng = np.random.default_rng(0)
prompts = [{"prompt_token_ids": rng.integers(100, 30000, int(rng.integers(8, 160))).tolist()} for _ in range(n)]
with LLM(model, load_format="dummy", dtype=dtype, tensor_parallel_size=tp, max_seq_len=512,
         max_batch_size=n, attention_backend=backend) as llm:
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
rows = []
for o in outs:
    c = o.outputs[0]
    top = [sorted(((lp.logprob, t) for t, lp in d.items()), reverse=True) for d in c.logprobs]
    rows.append(dict(tokens=list(c.token_ids), chosen=[d[t].logprob for d, t in zip(c.logprobs, c.token_ids)],
                     margin=[a[0][0] - a[1][0] if len(a) > 1 else float("inf") for a in top]))
print("ROWS", json.dumps(rows))
"""


def run(model, tp, n, max_tokens, backend, dtype, env=None):
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(tp), str(n), str(max_tokens), backend, dtype],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"tp={tp} failed:\n{out.stderr[-3000:]}")
    return json.loads([l for l in out.stdout.splitlines() if l.startswith("ROWS")][-1][len("ROWS "):])


def compare(base, other):
    equal, max_diff, margins = 0, 0.0, []
    for a, b in zip(base, other):
        j = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        upto = len(a["tokens"]) if j is None else j
        if upto:
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(a["chosen"][:upto], b["chosen"][:upto])))
        if j is None:
            equal += 1
        else:
            margins.append((j, a["margin"][j]))
    return equal, max_diff, margins


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="prompts are 8..160 tokens; max_seq_len is 512")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tie-margin", type=float, default=0.05, help="nats: a divergence below it is a near-tie")
    ap.add_argument("--env", action="append", default=None,
                    help="VAR=value,... for the compared runs only (the tp=1 base runs without): with --tp 1, the same "
                    "size against itself under the switches (e.g. JAXLLM_GEMV=small); repeat it for several sets, "
                    "each run at every --tp")
    ap.add_argument("--reference", default=None, metavar="DTYPE",
                    help="compare against tp=1 in DTYPE (float32) at JAX_DEFAULT_MATMUL_PRECISION=highest instead: "
                    "the same random weights (bfloat16 numbers), so each run's distance from exact arithmetic shows; "
                    "tp=1 in --dtype under the defaults runs too, as the yardstick")
    args = ap.parse_args()
    runs = [(f"{tp} {e}".strip(), tp, dict(kv.split("=", 1) for kv in e.split(",") if kv))
            for e in args.env or [""] for tp in args.tp if tp != 1 or e]
    if args.reference:
        base = run(args.model, 1, args.prompts, args.max_tokens, args.attention_backend, args.reference,
                   {"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
        runs = [("1 default", 1, {})] + runs
        what = f"tp=1 {args.reference}"
    else:
        base = run(args.model, 1, args.prompts, args.max_tokens, args.attention_backend, args.dtype)
        what = "tp=1"
    w = max(len(r[0]) for r in runs)
    print(f"{'tp':<{w}} {'equal to ' + what:>14} {'max |dlogprob| before':>22}  first divergences (position, {what} margin)")
    ok = True
    for label, tp, e in runs:
        equal, max_diff, margins = compare(base, run(args.model, tp, args.prompts, args.max_tokens, args.attention_backend,
                                                     args.dtype, e))
        ok &= all(m < args.tie_margin for _, m in margins)
        shown = ", ".join(f"({j}, {m:.4f})" for j, m in margins)
        print(f"{label:<{w}} {f'{equal}/{len(base)}':>14} {max_diff:>22.4f}  {shown or '-'}", flush=True)
    print("all divergences at near-ties" if ok else f"a divergence at a margin >= {args.tie_margin}: not numerics alone")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
