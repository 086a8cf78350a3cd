"""pallas.add_norm.add_rmsnorm at one row of Llama-3.1-8B (E 4096, y a split-K gemv's two float32
partial sums, as the batch-1 decode step calls it) over num_warps; device time by the profiler
(median per call), each checked against the default's output:

    PYTHONPATH=src python benchmarks/add_norm_sweep.py [--nw 1 2 4 8 16]
"""
import argparse, os, sys

import jax, jax.numpy as jnp, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import device_us  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.add_norm import add_rmsnorm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nw", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--e", type=int, default=4096)
    a = ap.parse_args()
    e, copies = a.e, 64
    xs = [jax.random.normal(jax.random.key(i), (1, e), jnp.bfloat16) for i in range(copies)]
    ys = jax.random.normal(jax.random.key(999), (2, 1, e), jnp.float32)
    w = jnp.linspace(0.5, 1.5, e).astype(jnp.bfloat16)
    ref = None
    print(f"{'num_warps':>9} {'us':>7}  same")
    for nw in a.nw:
        f = jax.jit(lambda xs, ys, w, nw=nw: [add_rmsnorm(x, ys, w, eps=1e-5, num_warps=nw) for x in xs])
        out = f(xs, ys, w)
        got = np.concatenate([np.asarray(t[1], np.float32).ravel() for t in out[:4]])
        ref = got if ref is None else ref
        us, _ = device_us(f, (xs, ys, w))
        print(f"{nw:>9} {us:7.2f}  {np.array_equal(got, ref)}", flush=True)


if __name__ == "__main__":
    main()
