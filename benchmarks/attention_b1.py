"""The Pallas decode kernel at batch 1 (Llama-3.1-8B: 32 query / 8 KV heads, head dim 128, 16-token
pages in a shuffled order), its variants' device time by the profiler (every kernel of a call summed; a ~5 us
kernel, which host timing cannot see), each checked against the float32 reference:

    PYTHONPATH=src python benchmarks/attention_b1.py [--contexts 192,1024] [--fp8]
"""
import argparse, json, os, sys

import jax, jax.numpy as jnp, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import gpu_kernels  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.decode_attention import paged_decode_attention, reference_decode_attention

VARIANTS = ['{"swap_ab": true}', '{"swap_ab": true, "block_kv": 128}', '{"swap_ab": true, "max_concurrent_steps": 3}',
            '{"swap_ab": true, "num_splits": 2}', '{"swap_ab": true, "num_splits": 4}', '{}',
            '{"swap_ab": true, "prefetch_pages": false}', '{"swap_ab": true, "heads_per_program": 2}']


def total_us(f, args, calls, reps=3):
    """Device time per call: every GPU kernel of `reps` runs of f (which makes `calls` calls), summed."""
    durs = [d for _, d in gpu_kernels(f, args, reps, "/tmp/attn-b1-trace")]
    return sum(durs) / (reps * calls), len(durs) / (reps * calls)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="192,1024")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--variants", default=";".join(VARIANTS))
    a = ap.parse_args()
    h, kvh, d, bs, copies = 32, 8, 128, 16, 32
    for ctx in map(int, a.contexts.split(",")):
        w = -(-ctx // bs)
        width = 1 << (w - 1).bit_length()  # the engine's table-width bucket
        rng = np.random.default_rng(ctx)
        pages = 4096
        dt = jnp.float8_e4m3fn if a.fp8 else jnp.bfloat16
        k = jax.random.normal(jax.random.key(1), (pages * bs, kvh, d), jnp.float32).astype(dt)
        v = jax.random.normal(jax.random.key(2), (pages * bs, kvh, d), jnp.float32).astype(dt)
        qs = [jnp.asarray(rng.standard_normal((1, h, d)), jnp.bfloat16) for _ in range(copies)]
        tables = [jnp.asarray(np.pad(rng.permutation(pages)[:w], (0, width - w))[None], jnp.int32) for _ in range(copies)]
        lens = jnp.full((1,), ctx, jnp.int32)
        ref = np.asarray(reference_decode_attention(qs[0], k.astype(jnp.float32), v.astype(jnp.float32), tables[0], lens, bs),
                         np.float32)
        print(f"context {ctx} ({'fp8' if a.fp8 else 'bf16'} pools, table width {width})")
        for spec in a.variants.split(";"):
            kw = json.loads(spec)
            f = jax.jit(lambda qs, k, v, ts, lens, kw=kw: [paged_decode_attention(q, k, v, t, lens, bs, **kw)
                                                            for q, t in zip(qs, ts)])
            try:
                out = f(qs, k, v, tables, lens)
                err = float(np.max(np.abs(np.asarray(out[0], np.float32) - ref)))
                us, n = total_us(f, (qs, k, v, tables, lens), copies)
            except Exception as e:  # noqa: BLE001
                print(f"  {spec:50} {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"  {spec:50} {us:6.2f} us  max|err| {err:.3f}  ({n:.1f} kernels a call)", flush=True)


if __name__ == "__main__":
    main()
