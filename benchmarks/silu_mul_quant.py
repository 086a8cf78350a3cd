"""pallas.silu_mul_quant against XLA's path for the same steps (an fp8-w8a8 MLP's gate/up scaling,
silu(gate) * up, per-token FP8 quantization for down) at Llama-3.1-8B's MLP width, alone: each
variant jitted over `--copies` different inputs, time per copy.

    PYTHONPATH=src python benchmarks/silu_mul_quant.py [--rows 64 256 1024]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.pallas.silu_mul_quant import silu_mul_quant


def xla_path(y, x_scale, w_scale):
    """What models/quant.py computes without the kernel: _fp8_matmul's scaling to bf16, qeinsum's
    silu(gate) * up, and the down projection's per-token quantization."""
    f = y.shape[-1] // 2
    gu = (y * x_scale[:, None] * w_scale[None, :]).astype(jnp.bfloat16)
    h = (jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(h), axis=-1, keepdims=True), 1e-12) / 448.0
    return jnp.clip(h / scale, -448.0, 448.0).astype(jnp.float8_e4m3fn), scale[:, 0]


def timed(f, *args, reps: int = 5) -> float:
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--copies", type=int, default=10)
    args = ap.parse_args()
    print(f"{'rows':>6} {'xla us':>9} {'kernel us':>10} {'kernel GB/s':>12}  mismatch")
    for m in args.rows:
        key = jax.random.key(m)
        ys = [30.0 * jax.random.normal(jax.random.fold_in(key, i), (m, 2 * args.f), jnp.float32)
              for i in range(args.copies)]
        xs = 0.01 + 0.1 * jax.random.uniform(jax.random.fold_in(key, 99), (m,))
        ws = 0.001 + 0.05 * jax.random.uniform(jax.random.fold_in(key, 98), (2 * args.f,))
        xla = jax.jit(lambda ys: [xla_path(y, xs, ws) for y in ys])
        ker = jax.jit(lambda ys: [silu_mul_quant(y, xs, ws) for y in ys])
        a, b = xla(ys[:1])[0][0], ker(ys[:1])[0][0]
        mismatch = float(np.mean(np.asarray(a.astype(jnp.float32)) != np.asarray(b.astype(jnp.float32))))
        tx, tk = timed(xla, ys) / args.copies, timed(ker, ys) / args.copies
        nbytes = m * 2 * args.f * 4 + m * args.f
        print(f"{m:>6} {1e6 * tx:9.1f} {1e6 * tk:10.1f} {nbytes / tk / 1e9:12.0f}  {mismatch:.4f}", flush=True)


if __name__ == "__main__":
    main()
