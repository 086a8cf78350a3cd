"""Where the compile time of the engine's step programs goes: tracing + lowering (Python) vs XLA.

    python benchmarks/compile_profile.py --model .models/llama-3.1-8b-shapes [--backends auto reference]

For each attention backend: a fresh LLM (dummy weights, compilation cache off), then one decode
program (1 row, widest table for 64 tokens) and one whole-prompt prefill program (1 row x 64 tokens), each
timed as lower (trace + lower to StableHLO, Python) and compile (XLA + kernels). The lowering of
the first is also profiled (cProfile: the 12 functions with the most cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--backends", nargs="+", default=["auto", "reference"])
    args = ap.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    from jaxllm import LLM

    for backend in args.backends:
        llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", max_batch_size=4, max_seq_len=512,
                  attention_backend=backend)
        eng = llm._engines[0]
        calls = eng._warmup_calls(64, [True])
        decode = [c for c in calls if c[0] == "decode" and c[2][0].shape[0] == 1][-1]  # widest table
        prefill = [c for c in calls if c[0] == "prefill" and c[2][0].shape[0] == 1][-1]  # longest prompt
        for name, call in (("decode", decode), ("prefill", prefill)):
            fn, a, kw = eng.runner._jit_call(*call)
            prof = cProfile.Profile() if name == "decode" else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            lowered = fn.lower(*a, **kw)
            if prof:
                prof.disable()
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            print(json.dumps(dict(backend=backend, program=name, lower_s=round(t1 - t0, 2),
                                  compile_s=round(t2 - t1, 2))), flush=True)
            if prof:
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
                print(s.getvalue()[-6000:], flush=True)
        llm.shutdown()


if __name__ == "__main__":
    main()
