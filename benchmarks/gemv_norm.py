"""The batch-1 output / down projection followed by the residual add + RMSNorm: pallas.gemv's split-K
partials handed to pallas.add_norm.add_rmsnorm (the models' path: two kernels) against gemv finishing
the add + norm in its last program (`residual` / `norm_w`: one kernel), at Llama-3.1-8B's fp8 shapes.

    PYTHONPATH=src python benchmarks/gemv_norm.py [--copies 20]

Each timed program runs --copies independent pairs (each its own weight, so none stays in L2), 5
times; microseconds per pair. The forms' largest difference is printed (compiled, each sums in its own order: a bf16 rounding).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gemv import timed  # benchmarks/gemv.py
from jaxllm.pallas.add_norm import add_rmsnorm
from jaxllm.pallas.gemv import gemv, gemv_tiling

SHAPES = {"o": (4096, 4096, None), "down (silu * up)": (14336, 4096, "silu_mul")}  # K, N, act


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=20)
    args = ap.parse_args()
    print(f"{'projection':<18} {'two kernels us':>15} {'epilogue us':>12}  max |diff|")
    for name, (k, n, act) in SHAPES.items():
        tiling = gemv_tiling(1, k, n, 1, True)
        cases = []
        for i in range(args.copies):
            key = jax.random.key(1000 * i + k)
            ks = jax.random.split(key, 3)
            x = jax.random.normal(ks[0], (1, k if act is None else 2 * k), jnp.bfloat16)
            w = (0.02 * jax.random.normal(ks[1], (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
            cases.append((x, w, jnp.full((n,), 0.5, jnp.float32), jax.random.normal(ks[2], (1, n), jnp.bfloat16),
                          jnp.ones((n,), jnp.bfloat16)))
        two = jax.jit(lambda cs: [add_rmsnorm(r, gemv(x, w, s, k_minor=True, act=act, partials=True, **tiling), nw,
                                              eps=1e-5) for x, w, s, r, nw in cs])
        one = jax.jit(lambda cs: [gemv(x, w, s, r, nw, k_minor=True, act=act, eps=1e-5, **tiling)
                                  for x, w, s, r, nw in cs])
        equal = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                    for p, q in zip(two(cases), one(cases)) for a, b in zip(p, q))
        t2, t1 = timed(two, cases) / args.copies, timed(one, cases) / args.copies
        print(f"{name:<18} {1e6 * t2:>15.1f} {1e6 * t1:>12.1f}  {equal:.3g}", flush=True)


if __name__ == "__main__":
    main()
