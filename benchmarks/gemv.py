"""Decode-sized matmuls: jaxllm.pallas.gemv (a few tilings) against XLA's dot, at Llama-3.1-8B shapes.

    python benchmarks/gemv.py [--rows 1] [--copies 20] [--shapes tp2 tp2k fp8 tp1 int8] [--stages 4] [--json PATH]

Each timed call is one jitted program of --copies independent products, each with its own weight
(so no weight stays in L2 between them; a split-K tiling's partial sums are added by one more small
kernel per product, counted here), run 5 times; microseconds per product and GB/s of weight
bytes. Shapes: a tp=2 shard's gate/up, down, o, q and k/v (bf16 [K, N]), tp=1's, the fp8 weights
stored [N, K] and the int8 ones stored [K, N] (XLA baseline: weight-only, converted in the dot).
Every variant's result is checked against XLA's first.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.pallas.gemv import gemv, gemv_fits, gemv_tiling

SHAPES = {  # name: (K, N)
    "tp2": {"tp2 gate/up": (4096, 14336), "tp2 down": (7168, 4096), "tp2 o": (2048, 4096), "tp2 q": (4096, 2048),
            "tp2 kv": (4096, 1024)},
    "tp1": {"tp1 gate/up": (4096, 28672), "tp1 down": (14336, 4096), "tp1 o": (4096, 4096), "tp1 kv": (4096, 2048)},
    "fp8": {"fp8 gate/up": (4096, 28672), "fp8 down": (14336, 4096), "fp8 o": (4096, 4096), "fp8 qkv": (4096, 6144),
            "fp8 kv": (4096, 2048)},
    # a tp=2 shard's bf16 weights stored [N, K] as fp8's are (untried layout for bf16: multiply-adds over
    # 512-2048-byte runs of each weight row reached 75-81% of HBM bandwidth for fp8; the [K, N] bf16 gemvs
    # of the model ran at 47-59% at tp=2, tenth session)
    "tp2k": {"tp2k down": (7168, 4096), "tp2k o": (2048, 4096), "tp2k qkv": (4096, 3072)},
    "int8": {"int8 gate/up": (4096, 28672), "int8 down": (14336, 4096), "int8 o": (4096, 4096)},
}


def tilings(k: int, n: int, rows: int, itemsize: int, k_minor: bool):
    # what models get (pallas.gemv.gemv_tiling)
    yield dict(gemv_tiling(rows, k, n, itemsize, k_minor), default=True)
    variants = [dict(block_n=bn, block_k=bk, fma=False) for bn in (64, 128) for bk in (64, 128)]
    if rows == 1 and k_minor:  # multiply-adds: narrower column blocks, longer K steps (256-2048 bytes of a row;
        # the longer runs untried before the tenth session: fp8 gate/up and down reached 75-81% of HBM bandwidth
        # in the model with 512-byte runs of rows K bytes apart)
        variants += [dict(block_n=bn, block_k=bk, fma=True) for bn, bk in
                     ((16, 512), (32, 128), (32, 256), (32, 512), (64, 128), (64, 256), (16, 1024), (32, 1024),
                      (16, 2048), (8, 2048))]
    elif rows == 1:  # [K, N]: a block's rows are its columns, so wide column blocks, short K steps
        variants += [dict(block_n=bn, block_k=bk, fma=True) for bn, bk in
                     ((128, 32), (128, 64), (256, 32), (256, 64), (512, 16), (512, 32))]
    for v in variants:
        blocks = n // v["block_n"]
        for splits in sorted({1, max(1, 264 // blocks)}):
            while splits > 1 and k % (splits * v["block_k"]):
                splits -= 1
            if gemv_fits(rows, k, n, v["block_n"], v["block_k"], splits):
                yield dict(v, splits=splits)
    if rows == 1 and k_minor:
        yield dict(block_n=32, block_k=512 // itemsize, splits=1, fma=True, num_warps=8)


def timed(f, *args, reps: int = 5) -> float:
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--shapes", nargs="+", default=["tp2", "fp8"], choices=list(SHAPES))
    ap.add_argument("--stages", type=int, nargs="+", default=[4])
    ap.add_argument("--json", help="write every timed variant here (shape, K, N, us, GB/s, tiling)")
    args = ap.parse_args()
    rows, c = args.rows, args.copies
    table, records = [], []
    for group in args.shapes:
        fp8, int8 = group == "fp8", group == "int8"  # as the models store them: fp8 [N, K], int8 [K, N]
        k_minor = fp8 or group == "tp2k"  # weights stored [N, K]
        for name, (k, n) in SHAPES[group].items():
            key = jax.random.key(k * 7 + n)
            x = jax.random.normal(key, (rows, k), jnp.bfloat16)
            wshape = (n, k) if k_minor else (k, n)
            dtype = jnp.float8_e4m3fn if fp8 else jnp.int8 if int8 else jnp.bfloat16
            ws = [((100.0 if int8 else 0.02) * jax.random.normal(jax.random.fold_in(key, i), wshape, jnp.float32)
                   ).clip(-127, 127).astype(dtype) for i in range(c)]
            scale = jnp.full((n,), 0.5, jnp.float32) if fp8 or int8 else None
            nbytes = ws[0].size * ws[0].dtype.itemsize

            if fp8 or int8:
                def xla(x, ws, spec="mk,nk->mn" if fp8 else "mk,kn->mn"):
                    return [(jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
                             * scale).astype(x.dtype) for w in ws]
            else:
                def xla(x, ws, spec="mk,nk->mn" if k_minor else "mk,kn->mn"):
                    return [jnp.einsum(spec, x, w) for w in ws]
            xla = jax.jit(xla)
            ref = np.asarray(xla(x, ws[:1])[0], np.float32)
            t = timed(xla, x, ws) / c
            table.append((name, "xla", t, nbytes))
            print(f"{name:<12} {'xla':<34} {1e6 * t:8.1f} us {nbytes / t / 1e9:7.0f} GB/s", flush=True)
            for tiling in tilings(k, n, rows, ws[0].dtype.itemsize, k_minor):
                default = tiling.pop("default", False)
                for stages in args.stages:
                    label = ("default " if default else "") + " ".join(
                        f"{a}={b}" for a, b in tiling.items()) + f" st={stages}"
                    f = jax.jit(lambda x, ws, tiling=tiling, stages=stages: [
                        gemv(x, w, scale, k_minor=k_minor, num_stages=stages, **tiling) for w in ws])
                    try:
                        got = np.asarray(f(x, ws[:1])[0], np.float32)
                        err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-9))
                        t = timed(f, x, ws) / c
                    except Exception as e:  # a tiling Triton cannot compile: say so, go on
                        print(f"{name:<12} {label:<34} failed: {str(e).splitlines()[0][:100]}", flush=True)
                        continue
                    table.append((name, label, t, nbytes))
                    records.append(dict(shape=name, k=k, n=n, us=1e6 * t, gbs=nbytes / t / 1e9, default=default,
                                        stages=stages, **tiling))
                    print(f"{name:<12} {label:<34} {1e6 * t:8.1f} us {nbytes / t / 1e9:7.0f} GB/s  rel err {err:.1e}",
                          flush=True)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print("\nbest per shape (us, GB/s): xla | gemv's default tiling | best gemv")
    for name in dict.fromkeys(r[0] for r in table):
        rs = [r for r in table if r[0] == name]
        x = [r for r in rs if r[1] == "xla"][0]
        best = min((r for r in rs if r[1] != "xla"), key=lambda r: r[2], default=None)
        b = f"{1e6 * best[2]:.1f} us {best[3] / best[2] / 1e9:.0f} GB/s ({best[1]})" if best else "-"
        d = [r for r in rs if r[1].startswith("default")]
        d = f"{1e6 * d[0][2]:.1f} us" if d else "-"
        print(f"  {name:<12} {1e6 * x[2]:7.1f} us {x[3] / x[2] / 1e9:5.0f} GB/s | default {d} | {b}")


if __name__ == "__main__":
    main()
