"""The models' pallas.gemv (fp8 [N, K], one row, fma) at Llama-3.1-8B's shapes over narrow-row,
long-K tilings, the default marked *; the kernel's device time by the profiler (median per call).

    PYTHONPATH=src python benchmarks/gemv_sweep.py [OUT.json]

Found that 8B's gate/up reads fastest as 4 whole rows a program (BENCHMARKS.md "Seventeenth session").
"""
import itertools, json, os, sys

import jax, jax.numpy as jnp, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import device_us  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.gemv import gemv, gemv_fits, gemv_tiling, reference_gemv

SHAPES = {"gate/up": (4096, 28672, None, 6), "down": (14336, 4096, "silu_mul", 10), "qkv": (4096, 6144, None, 20),
          "o": (4096, 4096, None, 20)}


def main():
    rows = []
    for name, (k, n, act, copies) in SHAPES.items():
        ws = [(0.05 * jax.random.normal(jax.random.key(c), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
              for c in range(copies)]
        scale = jnp.linspace(0.5, 1.5, n)
        x = jax.random.normal(jax.random.key(99), (1, k if act is None else 2 * k), jnp.bfloat16)
        ref = np.asarray(reference_gemv(x, ws[0], scale, k_minor=True, act=act), np.float32)
        default = gemv_tiling(1, k, n, 1, True)
        cands = [dict(default, default=True)]
        for bn, bk, nw, sp in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8), (1, 2, 4, 7)):
            if gemv_fits(1, k, n, bn, bk, sp) and (n // bn) * sp >= 264 and (n // bn) * sp <= 8192:
                cands.append(dict(block_n=bn, block_k=bk, splits=sp, num_warps=nw, fma=True))
        for t in cands:
            t = dict(t)
            is_default = t.pop("default", False)
            try:
                f = jax.jit(lambda x, ws: [gemv(x, w, scale, k_minor=True, act=act, partials=True, **t) for w in ws])
                out = f(x, ws)[0]
                got = np.asarray(jnp.sum(out, axis=0) if out.ndim == 3 else out, np.float32).reshape(-1)
                err = float(np.max(np.abs(got - ref.reshape(-1))) / np.max(np.abs(ref)))
                us, cnt = device_us(f, (x, ws))
                r = dict(shape=name, us=us, gbs=n * k / us / 1e3, err=err, default=is_default, **t)
                rows.append(r)
                print(f"{name:8} {'*' if is_default else ' '} bn={t['block_n']:3} bk={t['block_k']:5} sp={t['splits']} "
                      f"nw={t.get('num_warps', 4)}  {us:6.1f} us {r['gbs']:6.0f} GB/s err {err:.1e}", flush=True)
            except Exception as e:
                print(f"{name:8} {t}: {type(e).__name__} {str(e)[:200]}", flush=True)
    json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sweep.json", "w"), indent=1)
    print("\nbest per shape (default first):")
    for name in SHAPES:
        rs = sorted([r for r in rows if r["shape"] == name], key=lambda r: r["us"])
        d = [r for r in rs if r["default"]]
        for r in (d[:1] + rs[:4]):
            print(f"{name:8} {'*' if r['default'] else ' '} bn={r['block_n']:3} bk={r['block_k']:5} sp={r['splits']} "
                  f"nw={r.get('num_warps', 4)}  {r['us']:6.1f} us {r['gbs']:6.0f} GB/s")


if __name__ == "__main__":
    main()
