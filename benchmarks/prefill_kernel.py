"""Ragged paged prefill attention on the GPU: jaxllm's Mosaic GPU kernel vs the jnp reference and cuDNN.

    PYTHONPATH=src python benchmarks/prefill_kernel.py [--cases all] [--iters 20] [--json out.json]
    python benchmarks/prefill_kernel.py --cases smoke --interpret --heads 4 --kv-heads 2 --head-dim 64 \
        --block-size 16 --iters 1   # CPU: the script runs (cuDNN rows fail there)

Llama-3.1-8B attention shapes (32 query / 8 KV heads, head dim 128, bf16, pages of --block-size in
a shuffled order). Cases (query lengths x earlier context per row):
  fresh2k     1 x 2048 tokens, nothing cached (the TTFT prompt)
  fresh4x2k   4 x 2048, nothing cached
  chunk512    1 x 512-token chunk after 4096 cached tokens (chunked prefill)
  mixed8      8 rows of 512 queries after 0..4096 tokens (a mixed batch)
  short16     16 rows of 16 queries after 2048 tokens (prefix-cache hits with short suffixes)
Figures: us per call and TFLOP/s of causal attention (4 * D * H * sum over queries of the KV
positions each sees: the FLOPs a perfect causal kernel does). Baselines in the same run: the jnp
gather reference (jaxllm's CPU path), cuDNN flash attention through
``jax.nn.dot_product_attention(implementation="cudnn")`` on K/V already gathered into contiguous
[B, S, KVH, D] arrays (causal for fresh prompts; an explicit mask where there is earlier context),
and the same with the gather timed in. The kernel is checked against the float32 reference before
it is timed (relative error printed). Times: median of --reps runs of --iters back-to-back calls.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import jax
import jax.numpy as jnp

from jaxllm.pallas.prefill_attention import paged_prefill_attention, reference_prefill_attention
from jaxllm.runner.paged import reference_paged_attention

CASES = {
    "fresh2k": ([2048], [0]),
    "fresh4x2k": ([2048] * 4, [0] * 4),
    "chunk512": ([512], [4096]),
    "mixed8": ([512] * 8, [0, 512, 1024, 1536, 2048, 2560, 3072, 4096]),
    "short16": ([16] * 16, [2048] * 16),
    "smoke": ([70, 5], [40, 100]),  # CPU check of the script itself (--interpret)
}


def timeit(fn, args, iters, reps=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t0) / iters)
    return float(np.median(ts))


def make_case(q_lens, ctx, h, kvh, d, bs, seed=0):
    rng = np.random.default_rng(seed)
    b, t = len(q_lens), max(q_lens)
    w = -(-max(n + c for n, c in zip(q_lens, ctx)) // bs)
    nblocks = b * w
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(2 * seed), (nblocks * bs, kvh, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2 * seed + 1), (nblocks * bs, kvh, d), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(nblocks).reshape(b, w), jnp.int32)
    return q, k, v, tables, jnp.asarray(ctx, jnp.int32), jnp.asarray(q_lens, jnp.int32)


def causal_flops(q_lens, ctx, h, d, window=None):
    seen = sum(min(c + j + 1, window or 1 << 62) for n, c in zip(q_lens, ctx) for j in range(n))
    return 4 * d * h * seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="all")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--stages", default="2,3", help="max_concurrent_steps values to time")
    ap.add_argument("--block-kv", default="64,128")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test: the kernel interpreted")
    args = ap.parse_args()
    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    names = [c for c in CASES if c != "smoke"] if args.cases == "all" else args.cases.split(",")
    interpret = False
    if args.interpret:
        import jax.experimental.pallas.mosaic_gpu as plgpu

        interpret = plgpu.InterpretGPUParams()
    rows = []
    for name in names:
        q_lens, ctx = CASES[name]
        q, k, v, tables, qs, ql = make_case(q_lens, ctx, h, kvh, d, bs)
        b, t = q.shape[:2]
        flops = causal_flops(q_lens, ctx, h, d)
        ref = np.asarray(reference_prefill_attention(q, k, v, tables, qs, ql, bs))

        def report(variant, fn, call_args, check=False):
            try:
                if check:
                    out = np.asarray(fn(*call_args), np.float32)
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                else:
                    err = None
                sec = timeit(fn, call_args, args.iters)
            except Exception as e:  # noqa: BLE001 - a baseline that does not run is reported, not fatal
                print(f"{name:10s} {variant:34s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append(dict(case=name, variant=variant, error=str(e)[:500]))
                return
            row = dict(case=name, variant=variant, us=sec * 1e6, tflops=flops / sec / 1e12, rel_err=err)
            rows.append(row)
            e = f"  err {err:.2e}" if err is not None else ""
            print(f"{name:10s} {variant:34s} {sec * 1e6:10.1f} us {flops / sec / 1e12:8.1f} TFLOP/s{e}", flush=True)

        for stages in map(int, args.stages.split(",")):
            for bkv in map(int, args.block_kv.split(",")):
                if bkv % bs and bs % bkv:
                    continue
                fn = jax.jit(lambda *a, s=stages, bk=bkv: paged_prefill_attention(
                    *a, bs, max_concurrent_steps=s, block_kv=bk, interpret=interpret))
                report(f"kernel stages={stages} block_kv={bkv}", fn, (q, k, v, tables, qs, ql), check=True)

        positions = qs[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        ref_fn = jax.jit(lambda q, k, v, p, tb: reference_paged_attention(q, k, v, p, tb, bs, None))
        report("jnp reference (gather)", ref_fn, (q, k, v, positions, tables))

        # cuDNN on contiguous K/V: gathered once outside the timing, and with the gather inside it
        s_len = tables.shape[1] * bs
        slot_idx = (tables[:, :, None] * bs + jnp.arange(bs)).reshape(b, s_len)
        kc, vc = k[slot_idx], v[slot_idx]
        fresh = all(c == 0 for c in ctx)
        if fresh:
            def cudnn(q, kc, vc):
                return jax.nn.dot_product_attention(q, kc[:, :t], vc[:, :t], is_causal=True, query_seq_lengths=ql,
                                                    key_value_seq_lengths=ql, implementation="cudnn")
        else:
            kpos = jnp.arange(s_len)
            mask = (kpos[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S]

            def cudnn(q, kc, vc):
                return jax.nn.dot_product_attention(q, kc, vc, mask=mask, implementation="cudnn")
        report("cuDNN (K/V pre-gathered)", jax.jit(cudnn), (q, kc, vc), check=True)
        gather_cudnn = jax.jit(lambda q, k, v, tb: cudnn(
            q, k[(tb[:, :, None] * bs + jnp.arange(bs)).reshape(b, s_len)],
            v[(tb[:, :, None] * bs + jnp.arange(bs)).reshape(b, s_len)]))
        report("cuDNN + gather", gather_cudnn, (q, k, v, tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, shapes=dict(
                heads=h, kv_heads=kvh, head_dim=d, block_size=bs), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
