"""The models' pallas.gemv (fp8 [N, K], one row, fma) at Llama-3.1-8B's shapes over narrow-row,
long-K tilings, the default marked *; the kernel's device time by the profiler (median per call).

    PYTHONPATH=src python benchmarks/gemv_sweep.py [--json OUT] [--shapes gate/up down ...]
        [--bn 2 4 8 16] [--bk 1024 2048 4096] [--nw 4 8] [--sp 1 2 4 7] [--max-programs 8192]
        [--unroll 1 0] [--sum-last 0 1]

--unroll: the K loop's steps a loop body (0: all of them); --sum-last 1: per-thread sums reduced
across threads once at the end (gemv's sum_last).

Found that 8B's gate/up reads fastest as 4 whole rows a program (BENCHMARKS.md "Seventeenth session").
"""
import argparse, itertools, json, os, sys

import jax, jax.numpy as jnp, numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import device_us  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.gemv import gemv, gemv_fits, gemv_tiling, reference_gemv, silu_mul

SHAPES = {"gate/up": (4096, 28672, None, 6), "down": (14336, 4096, "silu_mul", 10), "qkv": (4096, 6144, None, 20),
          "o": (4096, 4096, None, 20), "down-plain": (14336, 4096, None, 10),  # down-plain: silu * up computed before
          "gate/up-silu": (4096, 28672, None, 6)}  # gate/up returning silu(gate) * up (out_act)
OUT_ACT = {"gate/up-silu": "silu_mul"}


def label(r):
    return (f"{'*' if r['default'] else ' '} bn={r['block_n']:3} bk={r['block_k']:5} sp={r['splits']} "
            f"nw={r.get('num_warps', 4)} un={r.get('unroll', 1)} sl={int(r.get('sum_last', False))}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="/tmp/sweep.json")
    ap.add_argument("--shapes", nargs="+", default=["gate/up", "down", "qkv", "o"], choices=list(SHAPES))
    ap.add_argument("--bn", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--bk", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--nw", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 7])
    ap.add_argument("--max-programs", type=int, default=8192)
    ap.add_argument("--unroll", type=int, nargs="+", default=[1])
    ap.add_argument("--sum-last", type=int, nargs="+", default=[0], choices=[0, 1])
    args = ap.parse_args()
    rows = []
    for name in args.shapes:
        k, n, act, copies = SHAPES[name]
        ws = [(0.05 * jax.random.normal(jax.random.key(c), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
              for c in range(copies)]
        scale = jnp.linspace(0.5, 1.5, n)
        x = jax.random.normal(jax.random.key(99), (1, k if act is None else 2 * k), jnp.bfloat16)
        out_act = OUT_ACT.get(name)
        ref = reference_gemv(x, ws[0], scale, k_minor=True, act=act)
        ref = np.asarray(silu_mul(ref) if out_act else ref, np.float32)
        default = gemv_tiling(1, k, n, 1, True, act=act, out_act=out_act)
        cands = [dict(default, default=True)]
        for bn, bk, nw, sp, un, sl in itertools.product(args.bn, args.bk, args.nw, args.sp, args.unroll, args.sum_last):
            if out_act and (sp > 1 or (n // 2) % bn or sl):
                continue
            if not gemv_fits(1, k, n, bn, bk, sp):
                continue
            steps = k // (sp * bk)
            un = steps if un == 0 else un
            if un > steps or (un > 1 and steps == 1):
                continue
            if (n // bn) * sp >= 264 and (n // bn) * sp <= args.max_programs:
                cands.append(dict(block_n=bn, block_k=bk, splits=sp, num_warps=nw, fma=True, unroll=un,
                                  sum_last=bool(sl)))
        for t in cands:
            t = dict(t)
            is_default = t.pop("default", False)
            try:
                f = jax.jit(lambda x, ws: [gemv(x, w, scale, k_minor=True, act=act, out_act=out_act, partials=True, **t)
                                           for w in ws])
                out = f(x, ws)[0]
                got = np.asarray(jnp.sum(out, axis=0) if out.ndim == 3 else out, np.float32).reshape(-1)
                err = float(np.max(np.abs(got - ref.reshape(-1))) / np.max(np.abs(ref)))
                us, cnt = device_us(f, (x, ws))
                r = dict(shape=name, us=us, gbs=n * k / us / 1e3, err=err, default=is_default, **t)
                rows.append(r)
                print(f"{name:8} {label(r)}  {us:6.1f} us {r['gbs']:6.0f} GB/s err {err:.1e}", flush=True)
            except Exception as e:
                print(f"{name:8} {t}: {type(e).__name__} {str(e)[:200]}", flush=True)
    json.dump(rows, open(args.json, "w"), indent=1)
    print("\nbest per shape (default first):")
    for name in args.shapes:
        rs = sorted([r for r in rows if r["shape"] == name], key=lambda r: r["us"])
        d = [r for r in rs if r["default"]]
        for r in (d[:1] + rs[:6]):
            print(f"{name:8} {label(r)}  {r['us']:6.1f} us {r['gbs']:6.0f} GB/s")


if __name__ == "__main__":
    main()
