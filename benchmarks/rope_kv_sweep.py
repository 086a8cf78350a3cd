"""pallas.rope_kv.gemv_rope_kv_write (the one-row fp8 q/k/v projection + RoPE + KV writes) at
Llama-3.1-8B's shapes over its tilings (block_n RoPE pairs a program, block_k, num_warps); the
kernel's device time by the profiler (median per call, 20 weight copies so nothing stays in L2),
checked against the first tiling's output:

    PYTHONPATH=src python benchmarks/rope_kv_sweep.py [--bn 1 2 4] [--bk 1024 2048 4096] [--nw 1 2 4 8]
"""
import argparse, itertools, os, sys

import jax, jax.numpy as jnp, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import device_us  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.rope_kv import gemv_rope_kv_write

E, KVH, G, D, SLOTS = 4096, 8, 4, 128, 4096


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bn", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--bk", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--nw", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--copies", type=int, default=20)
    a = ap.parse_args()
    n = KVH * (G + 2) * D
    ws = [(0.05 * jax.random.normal(jax.random.key(c), (n, E), jnp.float32)).astype(jnp.float8_e4m3fn)
          for c in range(a.copies)]
    scale = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(99), (1, E), jnp.bfloat16)
    ang = jnp.arange(D // 2, dtype=jnp.float32)[None] * 0.01
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    pools = [jnp.zeros((SLOTS, KVH, D), jnp.bfloat16) for _ in range(2)]
    slots = jnp.array([7], jnp.int32)
    rows, ref = [], None
    for bn, bk, nw in itertools.product(a.bn, a.bk, a.nw):
        def f(x, ws, kp, vp, bn=bn, bk=bk, nw=nw):
            outs = []
            for w in ws:
                q, kp, vp = gemv_rope_kv_write(x, w, scale, cos, sin, slots, kp, vp, group=G, dtype=jnp.bfloat16,
                                               block_n=bn, block_k=bk, num_warps=nw)
                outs.append(q)
            return outs, kp, vp

        g = jax.jit(f)
        try:
            q, kp, vp = g(x, ws, *pools)
            got = np.concatenate([np.asarray(q[-1], np.float32).ravel(), np.asarray(kp[7], np.float32).ravel(),
                                  np.asarray(vp[7], np.float32).ravel()])
            ref = got if ref is None else ref
            same = bool(np.array_equal(got, ref))
            us, cnt = device_us(g, (x, ws, *pools))
        except Exception as e:  # noqa: BLE001
            print(f"bn={bn} bk={bk} nw={nw}: {type(e).__name__} {str(e)[:200]}", flush=True)
            continue
        rows.append((us, bn, bk, nw, same))
        print(f"bn={bn} bk={bk:5} nw={nw}  {us:6.2f} us  {n * E / us / 1e3:6.0f} GB/s  same={same} ({cnt})", flush=True)
    print("\nfastest (default: bn=2 bk=4096 nw=4):")
    for us, bn, bk, nw, same in sorted(rows)[:8]:
        print(f"  bn={bn} bk={bk:5} nw={nw}  {us:6.2f} us  same={same}")


if __name__ == "__main__":
    main()
