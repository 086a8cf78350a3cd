"""pallas.silu_mul_quant against XLA's path for the same steps (an fp8-w8a8 MLP's gate/up scaling,
silu(gate) * up, per-token FP8 quantization for down) at Llama-3.1-8B's MLP width, alone: each
variant jitted over `--copies` different inputs, time per copy.

    PYTHONPATH=src python benchmarks/silu_mul_quant.py [--rows 64 256 1024 8192] [--dtype bfloat16]

The product comes in the activations' bf16 since the fourteenth session (--dtype float32: as
before). rowsN: N rows a program (JAXLLM_SILU_ROWS in the model), sharing w_scale's loads.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gemv import timed  # benchmarks/gemv.py: a jitted call's time over a few repetitions
from jaxllm.pallas.silu_mul_quant import silu_mul_quant


def xla_path(y, x_scale, w_scale):
    """What models/quant.py computes without the kernel: _fp8_matmul's scaling to bf16, qeinsum's
    silu(gate) * up, and the down projection's per-token quantization."""
    f = y.shape[-1] // 2
    gu = (y * x_scale[:, None] * w_scale[None, :]).astype(jnp.bfloat16)
    h = (jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(h), axis=-1, keepdims=True), 1e-12) / 448.0
    return jnp.clip(h / scale, -448.0, 448.0).astype(jnp.float8_e4m3fn), scale[:, 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024, 8192])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--copies", type=int, default=10)
    args = ap.parse_args()
    variants = {"looped": dict(unroll=False), "unrolled16": dict(unroll=True, num_warps=16),
                "unrolled8": dict(unroll=True, num_warps=8), "rows2": dict(rows=2), "rows4": dict(rows=4),
                "rows2_w8": dict(rows=2, num_warps=8), "rows4_w32": dict(rows=4, num_warps=32),
                "rows8_w32": dict(rows=8, num_warps=32)}
    print(f"{'rows':>6} {'xla us':>9} " + " ".join(f"{v + ' us':>14}" for v in variants) + "  best GB/s  mismatch")
    for m in args.rows:
        key = jax.random.key(m)
        ys = [(30.0 * jax.random.normal(jax.random.fold_in(key, i), (m, 2 * args.f), jnp.float32)).astype(args.dtype)
              for i in range(args.copies)]
        xs = 0.01 + 0.1 * jax.random.uniform(jax.random.fold_in(key, 99), (m,))
        ws = 0.001 + 0.05 * jax.random.uniform(jax.random.fold_in(key, 98), (2 * args.f,))
        xla = jax.jit(lambda ys: [xla_path(y, xs, ws) for y in ys])
        tx = timed(xla, ys) / args.copies
        times, mismatch = [], 0.0
        for kw in variants.values():
            ker = jax.jit(lambda ys, kw=kw: [silu_mul_quant(y, xs, ws, **kw) for y in ys])
            try:
                a, b = xla(ys[:1])[0][0], ker(ys[:1])[0][0]
                mismatch = float(np.mean(np.asarray(a.astype(jnp.float32)) != np.asarray(b.astype(jnp.float32))))
                times.append(timed(ker, ys) / args.copies)
            except Exception as e:  # a variant Triton cannot compile: say so, go on
                print(f"  {kw}: failed: {str(e).splitlines()[0][:100]}", flush=True)
                times.append(float("nan"))
        nbytes = m * 2 * args.f * jnp.dtype(args.dtype).itemsize + m * args.f  # the product read, h written
        best = np.nanmin(times)
        print(f"{m:>6} {1e6 * tx:9.1f} " + " ".join(f"{1e6 * t:14.1f}" for t in times)
              + f"  {nbytes / best / 1e9:9.0f}  {mismatch:.4f}", flush=True)


if __name__ == "__main__":
    main()
