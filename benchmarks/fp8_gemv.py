"""The Pallas fp8 GEMV against XLA's weight-only fp8 path and a bf16 matmul, at Llama-3.1-8B projection shapes.

    python benchmarks/fp8_gemv.py [--rows 1 8 32] [--iters 200] [--sweep]

For each projection shape (N outputs x K inputs) and batch rows M: the kernel's error against the
float32 reference, then microseconds per call and the weight bytes read per second for
  pallas  jaxllm.pallas.fp8_gemv (fp8 bytes from HBM, converted in the SM)
  xla     einsum(x, w.astype(bf16)) * scale, the models' weight-only path without the kernel
  bf16    x @ w^T with a bf16 weight (what an unquantized model reads)
Several copies of each weight rotate so that no call finds its weight in L2. Prints a table.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from decode_kernel import timeit  # benchmarks/ is the script's folder

from jaxllm.pallas.fp8_gemv import fp8_gemv, reference_fp8_gemv

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--sweep", action="store_true", help="also time block_k / stages / splits at batch 1")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    kernel = jax.jit(fp8_gemv)
    xla = jax.jit(lambda x, w, s: (jnp.einsum("mk,nk->mn", x, w.astype(x.dtype),
                                              preferred_element_type=jnp.float32) * s).astype(x.dtype))
    dense = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(3, -(-150 * 2**20 // (n * k)))  # > 150 MB of fp8 weights in rotation: more than L2
        ws = [jnp.asarray(np.clip(rng.standard_normal((n, k)) * 60, -448, 448), jnp.float32).astype(jnp.float8_e4m3fn)
              for _ in range(copies)]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        scale = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
        for m in args.rows:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            got = kernel(x, ws[0], scale)
            want = reference_fp8_gemv(x, ws[0], scale)
            err = float(jnp.linalg.norm((got - want).astype(jnp.float32)) / jnp.linalg.norm(want.astype(jnp.float32)))
            t = {
                "pallas": timeit(kernel, [(x, w, scale) for w in ws], args.iters),
                "xla": timeit(xla, [(x, w, scale) for w in ws], args.iters),
                "bf16": timeit(dense, [(x, w) for w in wb], args.iters),
            }
            rows.append((name, n, k, m, err, t))
            print(name, n, k, m, f"err {err:.2e}", {v: round(s * 1e6, 1) for v, s in t.items()}, flush=True)
    if args.sweep:  # kernel configurations at batch 1 on the two large shapes
        print("\nsweep (M=1): us per call")
        for name in ("gate/up", "down"):
            n, k = SHAPES[name]
            ws = [jnp.asarray(np.clip(rng.standard_normal((n, k)) * 60, -448, 448), jnp.float32).astype(jnp.float8_e4m3fn)
                  for _ in range(3)]
            scale = jnp.ones((n,), jnp.float32)
            x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
            for bk in (128, 256, 512):
                for st in (2, 4, 6):
                    for splits in (None, "x2"):
                        kw = dict(block_k=bk, max_concurrent_steps=st)
                        if splits:
                            kw["num_splits"] = min(k // bk, 2 * -(-264 // (n // 64)))
                        try:
                            f = jax.jit(functools.partial(fp8_gemv, **kw))
                            t = timeit(f, [(x, w, scale) for w in ws], args.iters)
                            print(f"  {name:<8} {kw}: {t * 1e6:.1f} us, {n * k / t / 1e9:.0f} GB/s", flush=True)
                        except Exception as e:  # noqa: BLE001 - a configuration that does not fit is reported
                            print(f"  {name:<8} {kw}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    print(f"\n{'proj':<8} {'N':>6} {'K':>6} {'M':>3} {'rel err':>8}  {'pallas us':>9} {'GB/s':>6}  {'xla us':>8} "
          f"{'GB/s':>6}  {'bf16 us':>8} {'GB/s':>6}")
    for name, n, k, m, err, t in rows:
        fp8_bytes, bf16_bytes = n * k, 2 * n * k
        print(f"{name:<8} {n:>6} {k:>6} {m:>3} {err:>8.1e}  {t['pallas'] * 1e6:>9.1f} {fp8_bytes / t['pallas'] / 1e9:>6.0f}"
              f"  {t['xla'] * 1e6:>8.1f} {fp8_bytes / t['xla'] / 1e9:>6.0f}  {t['bf16'] * 1e6:>8.1f} "
              f"{bf16_bytes / t['bf16'] / 1e9:>6.0f}")


if __name__ == "__main__":
    main()
