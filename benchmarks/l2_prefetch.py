"""Can a batch-1 decode layer hide weight reads in L2? A prototype layer at Llama-3.1-8B's fp8
shapes (add + norm, q/k/v gemv, an attention stand-in, o gemv, add + norm, gate/up -> silu x up,
down), where kernels that leave HBM idle (the add + norm kernels, the q/k/v gemv's ramp and tail)
get extra programs that read the *next* projection's first bytes into L2:

    PYTHONPATH=src python benchmarks/l2_prefetch.py [--layers 8] [--json OUT.json]

variants: none; qkv kernel prefetching all of W_o (read after the attention); the add + norm kernels
prefetching the first MB of the next projection; both; with and without evict_last on the prefetch
loads. Prints device time per layer (host-timed over many async calls) and per-kernel profiler
medians; a short table last.
"""
import argparse, json, os, statistics, sys, time
from collections import defaultdict

import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import gpu_kernels  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.add_norm import _normed, _residual, add_rmsnorm  # noqa: E402
from jaxllm.pallas.gemv import gemv, gemv_tiling

E, F, QKV = 4096, 14336, 6144
INTERPRET = jax.default_backend() == "cpu"


def _prefetch(pf_ref, d_ref, q, sections, rows_per, col0, ncols, per_section, evict):
    """Prefetch program q: rows_per rows x ncols bytes of the fp8 weight pf from its section's row,
    summed (a store that depends on every byte, so no load is dropped)."""
    sec = jax.lax.div(q, per_section)
    r0 = jnp.int32(sections[0])
    for i, s0 in enumerate(sections[1:], 1):
        r0 = jnp.where(sec == i, jnp.int32(s0), r0)
    row = pl.multiple_of(r0 + jax.lax.rem(q, per_section) * rows_per, rows_per)
    ref = pf_ref.at[pl.ds(row, rows_per), pl.ds(col0, ncols)]
    t = pltriton.load(ref, eviction_policy="evict_last") if evict and not INTERPRET else ref[...]
    d_ref[pl.ds(q, 1)] = jnp.sum(t.astype(jnp.float32)).reshape(1)


def addnorm_pf(x, parts, w, pf, spec, evict, eps=1e-5):
    """add_rmsnorm (y as [S, 1, E] partials) in program 0; programs 1.. prefetch spec's window of pf."""
    if pf is None:
        return add_rmsnorm(x, parts, w, eps=eps, interpret=INTERPRET)
    sections, rows_per, col0, ncols, per_section = spec
    p = len(sections) * per_section

    def kernel(x_ref, y_ref, w_ref, pf_ref, h_ref, n_ref, d_ref):
        i = pl.program_id(0)

        @pl.when(i == 0)
        def _():
            h = _residual(x_ref[...], jnp.sum(y_ref[...].astype(jnp.float32), axis=0), x.dtype)
            h_ref[...] = h
            n_ref[...] = _normed(h, w_ref[...], eps).astype(x.dtype)

        @pl.when(i > 0)
        def _():
            _prefetch(pf_ref, d_ref, i - 1, sections, rows_per, col0, ncols, per_section, evict)

    h, n, _ = pl.pallas_call(
        kernel, grid=(1 + p,),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2 + (jax.ShapeDtypeStruct((p,), jnp.float32),),
        in_specs=[pl.BlockSpec()] * 4, out_specs=[pl.BlockSpec()] * 3,
        compiler_params=pltriton.CompilerParams(num_warps=8), interpret=INTERPRET)(x, parts, w, pf)
    return h, n


def qkv_pf(x, w, pf, p, mode, evict, bn=2, bk=1024, splits=2, nw=1):
    """The q/k/v gemv (fma, narrow tiling: float32 partials [splits, 1, N]) with p extra programs
    per split reading all of pf (W_o), placed at the head, the tail or interleaved."""
    n, k = w.shape
    steps = k // (splits * bk)
    blocks = n // bn
    rows = pf.shape[0] if pf is not None else 0
    rows_per = rows // (p * splits) if p else 0
    if p and (mode == "mix" and blocks % p):
        raise ValueError("mix: blocks % p")

    def kernel(x_ref, w_ref, *refs):
        pf_ref, o_ref, d_ref = refs if p else (None, refs[0], None)
        j, s = pl.program_id(0), pl.program_id(1)
        if not p:
            b, is_pf, q = j, None, None
        elif mode == "tail":
            b, q, is_pf = j, j - blocks, j >= blocks
        elif mode == "head":
            b, q, is_pf = j - p, j, j < p
        else:  # one prefetch program after every blocks / p gemv blocks
            r = blocks // p + 1
            g, lane = jax.lax.div(j, r), jax.lax.rem(j, r)
            b, q, is_pf = g * (r - 1) + lane, g, lane == r - 1

        def gemv_block():
            cols = pl.ds(pl.multiple_of(b * bn, bn), bn)

            def body(i, acc):
                off = pl.multiple_of((s * steps + i) * bk, bk)
                xs = x_ref[0, pl.ds(off, bk)].astype(jnp.float32)
                return acc + jnp.sum(w_ref[cols, pl.ds(off, bk)].astype(jnp.float32) * xs[None, :], axis=1)[None]

            acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((1, bn), jnp.float32))
            o_ref[pl.ds(s, 1), :, cols] = acc[None]

        if not p:
            gemv_block()
            return
        pl.when(jnp.logical_not(is_pf))(gemv_block)
        pl.when(is_pf)(lambda: _prefetch(pf_ref, d_ref, q * splits + s, (0,), rows_per, 0, pf.shape[1], p * splits,
                                         evict))

    outs = (jax.ShapeDtypeStruct((splits, 1, n), jnp.float32),)
    if p:
        outs += (jax.ShapeDtypeStruct((p * splits,), jnp.float32),)
    ops = (x, w) + ((pf,) if p else ())
    res = pl.pallas_call(kernel, grid=(blocks + p, splits), out_shape=outs, in_specs=[pl.BlockSpec()] * len(ops),
                         out_specs=[pl.BlockSpec()] * len(outs),
                         compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=4),
                         interpret=INTERPRET)(*ops)
    return res[0]


def tiled_gemv(x, w, **kw):
    n, k = w.shape
    t = gemv_tiling(1, k, n, 1, True, out_act=kw.get("out_act"))
    t = {key: t[key] for key in ("block_n", "block_k", "splits", "num_warps", "fma") if key in t}
    return gemv(x, w, k_minor=True, interpret=INTERPRET, **t, **kw)


def layer(h, y, ws, v):
    wqkv, wo, wgu, wd, nw1, nw2 = ws
    mb = v["norm_mb"]
    # add + norm, prefetching W_qkv's first programs' bytes (split 0: K's first half, rows in order)
    spec = None
    if mb:
        rows = int(mb * 2**20) // (2048)  # rows of W_qkv's first K half (2048 bytes each)
        rp = 8
        spec = ((0,), rp, 0, 2048, rows // rp)
    h, n = addnorm_pf(h, y, nw1, wqkv if mb else None, spec, v["evict"])
    parts = qkv_pf(n, wqkv, wo if v["qkv_p"] else None, v["qkv_p"], v["mode"], v["evict"])
    qkv = jnp.sum(parts, axis=0).astype(jnp.bfloat16)
    att = jnp.tanh(qkv[:, :E])  # the attention's stand-in (reads nothing big)
    o = tiled_gemv(att, wo, partials=True)
    spec = None
    if mb:  # W_gu's first programs read gate rows 0.. and up rows F..: both halves' first rows
        rows = int(mb * 2**20) // (2 * 4096)
        rp = 4
        spec = ((0, F), rp, 0, 4096, rows // rp)
    h, n = addnorm_pf(h, o, nw2, wgu if mb else None, spec, v["evict"])
    a = tiled_gemv(n, wgu, out_act="silu_mul")
    y = tiled_gemv(a, wd, partials=True)
    return h, y


def profile(f, args):
    """Median device µs and count of each kernel (by name) over 3 calls of f."""
    by = defaultdict(list)
    for name, dur in gpu_kernels(f, args, 3, "/tmp/l2pf-trace"):
        by[name[:40]].append(dur)
    return {k: (statistics.median(d), len(d)) for k, d in by.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="CPU: tiny check of the kernels against plain jnp")
    a = ap.parse_args()
    if a.quick:
        return check()
    key = jax.random.key(0)

    def fp8(i, shape):
        return (0.05 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(jnp.float8_e4m3fn)

    layers = [(fp8(10 * l, (QKV, E)), fp8(10 * l + 1, (E, E)), fp8(10 * l + 2, (2 * F, E)), fp8(10 * l + 3, (E, F)),
               jnp.ones((E,), jnp.bfloat16), jnp.ones((E,), jnp.bfloat16)) for l in range(a.layers)]
    x0 = jax.random.normal(jax.random.key(1), (1, E), jnp.bfloat16)
    y0 = jnp.zeros((2, 1, E), jnp.float32)
    variants = [
        dict(name="none", qkv_p=0, mode="mix", norm_mb=0, evict=False),
        dict(name="qkv->o mix", qkv_p=512, mode="mix", norm_mb=0, evict=False),
        dict(name="qkv->o mix el", qkv_p=512, mode="mix", norm_mb=0, evict=True),
        dict(name="qkv->o head el", qkv_p=512, mode="head", norm_mb=0, evict=True),
        dict(name="qkv->o tail el", qkv_p=512, mode="tail", norm_mb=0, evict=True),
        dict(name="norm 2MB el", qkv_p=0, mode="mix", norm_mb=2, evict=True),
        dict(name="norm 4MB el", qkv_p=0, mode="mix", norm_mb=4, evict=True),
        dict(name="norm 8MB el", qkv_p=0, mode="mix", norm_mb=8, evict=True),
        dict(name="both 4MB el", qkv_p=512, mode="mix", norm_mb=4, evict=True),
        dict(name="both 4MB", qkv_p=512, mode="mix", norm_mb=4, evict=False),
        dict(name="none again", qkv_p=0, mode="mix", norm_mb=0, evict=False),
    ]
    results = []
    ref = None
    for v in variants:
        def step(x, y, layers, v=v):
            h = x
            for ws in layers:
                h, y = layer(h, y, ws, v)
            return h, y

        f = jax.jit(step)
        try:
            out = jax.block_until_ready(f(x0, y0, layers))
        except Exception as e:
            print(f"{v['name']:16} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        got = np.asarray(out[0], np.float32)
        if ref is None:
            ref = got
        err = float(np.max(np.abs(got - ref)))
        for _ in range(3):
            jax.block_until_ready(f(x0, y0, layers))
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = f(x0, y0, layers)
        jax.block_until_ready(out)
        us = (time.perf_counter() - t0) / a.iters / a.layers * 1e6
        kern = profile(f, (x0, y0, layers))
        r = dict(v, us_per_layer=us, err=err, kernels={k: d for k, d in kern.items()})
        results.append(r)
        print(f"== {v['name']:16} {us:7.2f} us/layer  max|diff| vs none {err:.2e}", flush=True)
        for k, (d, c) in sorted(kern.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
            print(f"     {k:40} {d:7.2f} us x{c}", flush=True)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1, default=str)
    print(f"\n{'variant':18} {'us/layer':>9}  {'diff':>8}")
    for r in results:
        print(f"{r['name']:18} {r['us_per_layer']:9.2f}  {r['err']:8.1e}")


def check():
    """CPU (interpret mode): the prefetch programs change nothing; the kernels match plain jnp."""
    key = jax.random.key(0)
    w = (0.05 * jax.random.normal(key, (64, 4096), jnp.float32)).astype(jnp.float8_e4m3fn)
    pf = (0.05 * jax.random.normal(jax.random.key(2), (64, 4096), jnp.float32)).astype(jnp.float8_e4m3fn)
    x = jax.random.normal(jax.random.key(1), (1, 4096), jnp.bfloat16)
    ref = jnp.einsum("k,nk->n", x[0].astype(jnp.float32), w.astype(jnp.float32))
    for p, mode in ((0, "mix"), (4, "mix"), (4, "head"), (4, "tail")):
        got = jnp.sum(qkv_pf(x, w, pf if p else None, p, mode, False), axis=(0, 1))
        print(p, mode, float(jnp.max(jnp.abs(got - ref))))
    y = jax.random.normal(jax.random.key(3), (2, 1, 4096), jnp.float32)
    nw = jnp.ones((4096,), jnp.bfloat16)
    h0, n0 = add_rmsnorm(x, y, nw, eps=1e-5, interpret=True)
    h1, n1 = addnorm_pf(x, y, nw, pf, ((0, 32), 4, 0, 4096, 2), False)
    print("addnorm", float(jnp.max(jnp.abs(h0.astype(jnp.float32) - h1))), float(jnp.max(jnp.abs(n0.astype(jnp.float32) - n1))))


if __name__ == "__main__":
    main()
