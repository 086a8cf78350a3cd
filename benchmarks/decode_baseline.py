"""Decode baseline / offline throughput: jaxllm vs HF transformers (eager), random weights.

    python benchmarks/decode_baseline.py --model .models/llama-3.1-8b-shapes --batch-sizes 1,64
    python benchmarks/decode_baseline.py --model .models/llama-3.1-8b-shapes --batch-sizes 256 --num-requests 1000

--batch-sizes is the concurrency: jaxllm gets all --num-requests (default: the batch size) at once
with max_batch_size=batch and schedules them itself; HF runs them in consecutive batches of that
size (static batching, its best case: equal lengths, no padding).

Each backend runs in its own subprocess (so neither holds GPU memory while the other runs), on
prompts of random token ids, greedy, ignore_eos, exactly --output-len new tokens per request. A
warm-up run of the same shapes comes first (compilation for jaxllm, CUDA kernels for PyTorch); the
timed figure is the whole generate call (prefill included) over all output tokens. Prints one JSON
line per (backend, batch) and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def prompts(batch: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(vocab, 32000), size=(batch, input_len)).tolist()


def run_jaxllm(args, batch: int, attention_backend: str = "auto") -> dict:
    from jaxllm import LLM, SamplingParams

    n_req = args.num_requests or batch
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format="dummy",
        dtype="bfloat16",
        max_seq_len=args.input_len + args.output_len,
        max_batch_size=batch,
        decode_steps=args.decode_steps,
        attention_backend=attention_backend,
    )
    load_s = time.perf_counter() - t0
    print(f"jaxllm batch {batch}: loaded in {load_s:.1f}s", file=sys.stderr, flush=True)
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True, detokenize=False, temperature=0)
    vocab = llm.model_config.vocab_size
    # The warm-up (compilation) uses other prompts than the timed run: with the same prompts the
    # timed run would hit the prefix cache, prefill less and compile new shapes while timed.
    warm = [{"prompt_token_ids": p} for p in prompts(n_req, args.input_len, vocab, seed=1)]
    t0 = time.perf_counter()
    llm.generate(warm, sp, use_tqdm=False)  # compile + warm-up
    warm_s = time.perf_counter() - t0
    print(f"jaxllm batch {batch}: first run {warm_s:.1f}s", file=sys.stderr, flush=True)
    times = []
    for r in range(args.repeats):
        ps = [{"prompt_token_ids": p} for p in prompts(n_req, args.input_len, vocab, seed=100 + r)]
        t0 = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == n_req * args.output_len, n_out
    el = float(np.median(times))
    stats = llm.get_stats()
    return dict(
        backend="jaxllm" if attention_backend == "auto" else f"jaxllm-{attention_backend[:3]}",
        attention=llm._engine.runner.attention_backend,
        batch=batch,
        requests=n_req,
        seconds=el,
        out_tok_s=n_out / el,
        load_s=load_s,
        first_run_s=warm_s,
        kv_capacity_tokens=llm.kv_capacity_tokens,
        peak_kv_blocks=max(s["kv_blocks_used"] for s in stats),
        preemptions=stats[-1]["preemptions"],
    )


def run_hf(args, batch: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager").eval()
    print(f"hf batch {batch}: model built", file=sys.stderr, flush=True)
    n_req = args.num_requests or batch
    all_ids = torch.tensor(prompts(n_req, args.input_len, cfg.vocab_size), device="cuda")
    kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(all_ids[:batch], **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            n_out = 0
            t0 = time.perf_counter()
            for i in range(0, n_req, batch):
                out = model.generate(all_ids[i : i + batch], **kw)
                n_out += (out.shape[1] - args.input_len) * out.shape[0]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    el = float(np.median(times))
    return dict(backend="hf-eager", batch=batch, requests=n_req, seconds=el, out_tok_s=n_out / el)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=None, help="default: one batch")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="jaxllm,hf", help="of jaxllm, jaxllm-ref, hf")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per backend and batch")
    ap.add_argument("--stack-every", type=float, default=90, help="dump stacks of a slow run every N s")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "backend:batch" in a subprocess
    args = ap.parse_args()

    if args.one:
        import faulthandler

        faulthandler.dump_traceback_later(args.stack_every, repeat=True)  # shows where a slow run is
        backend, batch = args.one.split(":")
        if backend == "hf":
            res = run_hf(args, int(batch))
        else:  # jaxllm (attention "auto") or jaxllm-ref (the jnp reference attention)
            res = run_jaxllm(args, int(batch), "reference" if backend == "jaxllm-ref" else "auto")
        print("RESULT " + json.dumps(res), flush=True)
        return

    results = []
    for backend in args.backends.split(","):
        for batch in map(int, args.batch_sizes.split(",")):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{backend}:{batch}"]
            try:  # stderr streams through, so progress and stack dumps show live
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results.append(dict(backend=backend, batch=batch, error=f"timeout {args.timeout}s"))
                continue
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                results.append(dict(backend=backend, batch=batch, error=f"exit {proc.returncode}"))
                continue
            res = json.loads(lines[-1][7:])
            print(json.dumps(res), flush=True)
            results.append(res)

    print(f"\n{'backend':<10} {'batch':>5} {'reqs':>5} {'out tok/s':>10} {'ms/step':>8}  notes")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<10} {r['batch']:>5}  {r['error']}")
            continue
        steps = args.output_len * -(-r["requests"] // r["batch"])  # decode steps if run in waves
        ms = 1000 * r["seconds"] / steps
        notes = ""
        if "load_s" in r:
            notes = (
                f"load {r['load_s']:.1f}s, first run {r['first_run_s']:.1f}s, peak KV blocks "
                f"{r['peak_kv_blocks']}, preemptions {r['preemptions']}"
            )
        print(f"{r['backend']:<10} {r['batch']:>5} {r['requests']:>5} {r['out_tok_s']:>10.1f} {ms:>8.2f}  {notes}")


if __name__ == "__main__":
    main()
