"""GPU check: whole-prompt prefill through cuDNN (attention_backend auto) vs the jnp reference:
first-token logprobs of a tiny random Llama in bf16 agree, and the greedy tokens are printed.

    PYTHONPATH=src python benchmarks/prefill_check.py MODEL_DIR
"""

import sys

import numpy as np

from jaxllm import LLM, SamplingParams

path = sys.argv[1]
prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 200, 33)]
sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
res = {}
for backend in ("auto", "reference"):
    with LLM(path, dtype="bfloat16", max_seq_len=512, attention_backend=backend) as llm:
        r = llm._engine.runner
        print(backend, "decode:", r.attention_backend, "fresh prefill:", r._fresh_impl)
        res[backend] = llm.generate(prompts, sp, use_tqdm=False)
worst = 0.0
for a, b in zip(res["auto"], res["reference"]):
    ea, eb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
    common = set(ea) & set(eb)
    worst = max(worst, max(abs(ea[t].logprob - eb[t].logprob) for t in common))
    print("tokens auto", a.outputs[0].token_ids, "ref", b.outputs[0].token_ids)
print(f"max |first-token logprob difference| = {worst:.4f}")
assert worst < 0.05, worst
