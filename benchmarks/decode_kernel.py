"""Paged decode attention on the GPU: jaxllm's Mosaic GPU kernel (variants) vs the baselines.

    PYTHONPATH=src python benchmarks/decode_kernel.py [--contexts 2048,8192] [--batch 64]

    # several KV heads per program at the throughput shape (1024 sequences of 160 tokens, 16-token
    # pages), bf16 and fp8 pools, each heads_per_program x block_kv x stages (only this sweep):
    PYTHONPATH=src python benchmarks/decode_kernel.py --batch 1024 --contexts 160 --block-size 16 \
        --heads-per-program 1,2,4,8 --block-kv 64,128 --stages 2,3,4 --variants hpp

Llama-3.1-8B attention shapes (32 query / 8 KV heads, head dim 128, bf16), every sequence at the
full context, pages in a shuffled order. Figures: the effective KV read bandwidth (K and V bytes of
every sequence / kernel time, the issue's metric) next to the roofline (a device-to-device copy of
1 GiB, bytes read + written, measured in the same run) and two baselines measured in the same run:
the plain-XLA gather (jaxllm's jnp reference path) and JAX's own (deprecated) Triton paged
attention. With --fp8 (default on) the kernel also reads float8_e4m3fn pools of the same values
(``KvCacheConfig(dtype="fp8")``: half the bytes; its TB/s counts the fp8 bytes, so compare the
us column with bf16's). Each variant is checked against the float32 reference before it is timed. Times are the
median of --iters calls, each call timed with a device sync; inputs rotate over 3 copies of the
pool so no call reads what the last one left in L2.

--heads-per-program 1,2,4,8 adds a sweep (variants named "mosaic hpp ..."): the kernel with each
heads_per_program value, on bf16 pools and (--fp8) fp8 pools, crossed with each --block-kv and
--stages (max_concurrent_steps) value (the kernel's defaults, 64 and 2, where those are not given);
a short table of the sweep (variant, us, effective TB/s) is printed last.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

import jax
import jax.numpy as jnp

from jaxllm.pallas.decode_attention import paged_decode_attention, reference_decode_attention
from jaxllm.pallas.decode_attention_triton import paged_decode_attention_triton
from jaxllm.runner.paged import reference_paged_attention


def timeit(fn, args_list, iters, reps=5):
    """Median over `reps` of (time of `iters` calls issued back to back) / iters: dispatch overlaps
    the previous call's execution, as in a decode loop, so the host's cost per call drops out."""
    for a in args_list:
        jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):  # only the last result is kept: the stream runs them in order
            out = fn(*args_list[i % len(args_list)])
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters)
    return float(np.median(ts))


def copy_bandwidth(iters):
    x = [jnp.ones((512 * 2**20,), jnp.bfloat16) * i for i in range(3)]  # 1 GiB each
    f = jax.jit(lambda a: a + 1)
    t = timeit(f, [(a,) for a in x], iters)
    return 2 * x[0].nbytes / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--variants", default="all",
                    help="name filters, separated by commas (or by semicolons where names hold commas): a variant runs "
                         "if its name contains one (=NAME: is NAME)")
    ap.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True, help="also fp8 KV pools")
    ap.add_argument("--triton", default=None,
                    help="pallas.decode_attention_triton tilings to time, block_kv/num_warps/num_stages[/mh],... (m: "
                         "masked_loads, the rows past a sequence not read; h: heads_fastest)")
    ap.add_argument("--mosaic-fp8", default=None,
                    help="more Mosaic kernel forms on the fp8 pools, ';'-separated keyword sets "
                         "(e.g. 'swap_ab=True,k_in_registers=True,lean_smem=True,heads_per_program=4'); "
                         "values are Python literals")
    ap.add_argument("--heads-per-program", default=None,
                    help="comma-separated heads_per_program values to sweep (e.g. 1,2,4,8; divisors of the 8 KV "
                         "heads)")
    ap.add_argument("--block-kv", default=None,
                    help="comma-separated block_kv values for the --heads-per-program sweep")
    ap.add_argument("--stages", default=None,
                    help="comma-separated max_concurrent_steps values for the --heads-per-program sweep")
    ap.add_argument("--profile", default=None,
                    help="';'-separated kernel keyword sets as JSON (e.g. '{};{\"swap_ab\": true}'): each runs once "
                         "on the fp8 pools with Mosaic GPU's in-kernel profiler, and the mean time of each named "
                         "region a program spends is printed (per program and per ring step)")
    args = ap.parse_args()
    sweep = _hpp_sweep(args)
    b, h, kvh, d, bs = args.batch, 32, 8, 128, args.block_size
    rows = []
    roof = copy_bandwidth(args.iters)
    print(f"copy roofline: {roof / 1e12:.2f} TB/s", flush=True)
    rows.append(dict(variant="copy roofline (read+write)", tbps=roof / 1e12))
    for ctx in map(int, args.contexts.split(",")):
        w = ctx // bs
        nblocks = b * w
        rng = np.random.default_rng(ctx)
        sets = []
        for i in range(3):
            q = jnp.asarray(rng.standard_normal((b, h, d)), jnp.bfloat16)
            k = jax.random.normal(jax.random.key(2 * i), (nblocks * bs, kvh, d), jnp.bfloat16)
            v = jax.random.normal(jax.random.key(2 * i + 1), (nblocks * bs, kvh, d), jnp.bfloat16)
            tables = jnp.asarray(rng.permutation(nblocks).reshape(b, w), jnp.int32)
            lens = jnp.full((b,), ctx, jnp.int32)
            sets.append((q, k, v, tables, lens))
        kv_bytes = 2 * b * ctx * kvh * d * 2
        q, k, v, tables, lens = sets[0]
        ref = np.asarray(jax.jit(lambda *a: reference_decode_attention(*a, bs))(q, k, v, tables, lens))

        variants = {
            "xla gather (jaxllm reference path)": jax.jit(
                lambda q, k, v, t, l: reference_paged_attention(q[:, None], k, v, (l - 1)[:, None], t, bs, None)[:, 0]
            ),
        }
        for kw in [
            {},
            {"p_in_registers": True},
            {"lean_smem": True},
            {"swap_ab": True},
            {"swap_ab": True, "max_concurrent_steps": 3},
            {"prefetch_pages": False},
            {"max_concurrent_steps": 2},
            {"max_concurrent_steps": 3},
            {"block_kv": 128},
            {"num_splits": 1},
            {"num_splits": 4},
            {"num_splits": 8},
            {"heads_fastest": True},
        ]:
            name = "mosaic " + (",".join(f"{a}={c}" for a, c in kw.items()) or "default")
            variants[name] = jax.jit(lambda q, k, v, t, l, kw=kw: paged_decode_attention(q, k, v, t, l, bs, **kw))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

            def to_pages(x):  # [slots, kvh, d] -> [kvh, pages, bs, d] (outside the timing)
                return x.reshape(nblocks, bs, kvh, d).transpose(2, 0, 1, 3)

            # JAX's kernel does not scale the scores: pass q / sqrt(d)
            jax_sets = [((q * d**-0.5).astype(q.dtype), to_pages(k), to_pages(v), t, l) for (q, k, v, t, l) in sets]
            for splits in (1, 8, 16):
                if w % splits == 0:
                    variants[f"jax triton paged_attention k_splits={splits}"] = (
                        jax.jit(lambda q, k, v, t, l, s=splits: paged_attention(q, k, v, t, l, k_splits=s,
                                                                                 pages_per_compute_block=min(8, w // s))),
                        jax_sets,
                    )
        except Exception as e:  # noqa: BLE001
            print("jax paged_attention unavailable:", e, flush=True)

        hm_sets = [(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), t, l) for (q, k, v, t, l) in sets]
        for kw in [{}, {"max_concurrent_steps": 2}, {"max_concurrent_steps": 3}, {"block_kv": 128}]:
            name = "mosaic heads-major pool " + (",".join(f"{a}={c}" for a, c in kw.items()) or "default")
            variants[name] = (
                jax.jit(lambda q, k, v, t, l, kw=kw: paged_decode_attention(q, k, v, t, l, bs, heads_major=True, **kw)),
                hm_sets,
            )

        if args.fp8:  # the same K/V in fp8 (scale 1: N(0, 1) values sit well inside +-448)
            f8 = jnp.float8_e4m3fn
            fp8_sets = [(q, k.astype(f8), v.astype(f8), t, l) for (q, k, v, t, l) in sets]
            ref8 = np.asarray(jax.jit(lambda *a: reference_decode_attention(*a, bs))(*fp8_sets[0]))
            # (the fourteenth session's sweep of the unswapped forms: BENCHMARKS.md; swap_ab is the engine's default)
            swap, kreg = {"swap_ab": True}, {"swap_ab": True, "k_in_registers": True}
            for kw in [{}, swap, {**swap, "lean_smem": True}, {**swap, "heads_per_program": 2},
                       {**swap, "heads_per_program": 4}, {**swap, "num_splits": 1},
                       kreg, {**kreg, "lean_smem": True}, {**kreg, "max_concurrent_steps": 3},
                       {**kreg, "lean_smem": True, "max_concurrent_steps": 3}, {**kreg, "heads_per_program": 2},
                       {**kreg, "lean_smem": True, "heads_per_program": 2}, *_keyword_sets(args.mosaic_fp8)]:
                name = "mosaic fp8 " + (",".join(f"{a}={c}" for a, c in kw.items()) or "default")
                variants[name] = (
                    jax.jit(lambda q, k, v, t, l, kw=kw: paged_decode_attention(q, k, v, t, l, bs, **kw)),
                    fp8_sets, ref8, kv_bytes // 2,
                )

        for tiling in args.triton.split(",") if args.triton else ():  # the Triton kernel's tilings
            # a 4th field of letters: m, the rows past a sequence not read; h, the KV heads the grid's fastest axis
            bkv, nw, ns, *flags = tiling.split("/")
            tkw = dict(block_kv=int(bkv), num_warps=int(nw), num_stages=int(ns), masked_loads="m" in "".join(flags),
                       heads_fastest="h" in "".join(flags))
            tfn = jax.jit(lambda q, k, v, t, l, tkw=tkw: paged_decode_attention_triton(q, k, v, t, l, bs, **tkw))
            variants[f"triton bf16 {tiling}"] = tfn
            if args.fp8:
                variants[f"triton fp8 {tiling}"] = (tfn, fp8_sets, ref8, kv_bytes // 2)

        for name, fn in _hpp_variants(sweep, bs, sets, ref, kv_bytes, args.fp8).items():
            variants[name] = fn

        if args.profile:
            f8 = jnp.float8_e4m3fn
            q, k, v, t, l = sets[0]
            for kw in args.profile.split(";"):
                _profile(json.loads(kw), (q, k.astype(f8), v.astype(f8), t, l), bs, ctx)

        for name, fn in variants.items():
            fn, fsets, fref, fbytes = (fn + (ref, kv_bytes))[:4] if isinstance(fn, tuple) else (fn, sets, ref, kv_bytes)
            if args.variants != "all" and not any(name == s[1:] if s.startswith("=") else s in name
                                                  for s in args.variants.split(";" if ";" in args.variants else ",")):
                continue
            try:
                out = np.asarray(fn(*fsets[0]), np.float32)
                err = float(np.linalg.norm(out - fref) / np.linalg.norm(fref))
                t = timeit(fn, fsets, args.iters)
                row = dict(variant=name, ctx=ctx, batch=b, us=t * 1e6, tbps=fbytes / t / 1e12, rel_err=err,
                           of_roofline=fbytes / t / roof)
            except Exception as e:  # noqa: BLE001
                row = dict(variant=name, ctx=ctx, batch=b, error=f"{type(e).__name__}: {str(e)[:300]}")
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\n{'variant':<52} {'ctx':>5} {'us':>9} {'TB/s':>6} {'of roof':>7} {'rel err':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<52} {r['ctx']:>5}  ERROR {r['error'][:80]}")
        elif "ctx" not in r:
            print(f"{r['variant']:<52} {'':>5} {'':>9} {r['tbps']:>6.2f}")
        else:
            print(f"{r['variant']:<52} {r['ctx']:>5} {r['us']:>9.1f} {r['tbps']:>6.2f} {r['of_roofline']:>7.1%} "
                  f"{r['rel_err']:>8.1e}")
    if sweep:
        print(f"\nheads_per_program sweep, batch {b}, block size {bs} (TB/s: K+V bytes read / time; fp8 counts fp8 bytes)")
        print(f"{'variant':<60} {'ctx':>5} {'us':>9} {'TB/s':>6}")
        for r in rows:
            if r["variant"].startswith("mosaic hpp"):
                if "error" in r:
                    print(f"{r['variant']:<60} {r['ctx']:>5}  ERROR {r['error'][:60]}")
                else:
                    print(f"{r['variant']:<60} {r['ctx']:>5} {r['us']:>9.1f} {r['tbps']:>6.2f}")


def _profile(kw, args, bs, ctx):
    """Run the kernel once with its in-kernel profiler (paged_decode_attention's profile_dir) and print
    each named region's mean time per program (all its steps) and per occurrence."""
    import glob
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            jax.block_until_ready(jax.jit(lambda *a: paged_decode_attention(*a, bs, profile_dir=tmp, **kw))(*args))
            trace = json.load(open(sorted(glob.glob(f"{tmp}/*.json"))[-1]))["traceEvents"]
        except Exception as e:  # noqa: BLE001
            print(f"profile {kw}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
    _print_profile(_summarize(trace), f"profile {kw or 'default'} (fp8, ctx {ctx})")


def _summarize(trace):
    """(programs, mean us from a program's first to last event, {region: (total us, occurrences)})."""
    from collections import defaultdict

    total, count, open_at, spans = defaultdict(float), defaultdict(int), {}, {}
    for ev in trace:  # B/E pairs per program (tid), nested regions on a stack
        key = (ev["tid"], ev["name"])
        if ev["ph"] == "B":
            open_at[key] = ev["ts"]
        elif key in open_at:
            total[ev["name"]] += ev["ts"] - open_at.pop(key)
            count[ev["name"]] += 1
        lo, hi = spans.get(ev["tid"], (ev["ts"], ev["ts"]))
        spans[ev["tid"]] = (min(lo, ev["ts"]), max(hi, ev["ts"]))
    programs = len(spans)
    span = sum(hi - lo for lo, hi in spans.values()) / max(programs, 1)
    return programs, span, {n: (total[n], count[n]) for n in total}


def _print_profile(summary, title):
    programs, span, regions = summary
    n = max(programs, 1)
    print(f"\n{title}: {programs} programs, {span:.2f} us from first to last event a program", flush=True)
    for name, (tot, cnt) in sorted(regions.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:<10} {tot / n:8.3f} us a program  {tot / cnt:8.3f} us x {cnt / n:.1f}", flush=True)


def _ints(text):
    return [int(x) for x in text.split(",")] if text else None


def _keyword_sets(text):
    """'a=1,b=True;c=2' -> [{'a': 1, 'b': True}, {'c': 2}] (values Python literals)."""
    import ast

    return [{k: ast.literal_eval(v) for k, v in (item.split("=") for item in one.split(","))}
            for one in (text or "").split(";") if one]


def _hpp_sweep(args):
    """The (heads_per_program, block_kv, max_concurrent_steps) combinations of --heads-per-program
    (None: no sweep); --block-kv / --stages not given: the kernel's defaults."""
    hpps = _ints(args.heads_per_program)
    if not hpps:
        return []
    return [(n, bkv, st) for n in hpps for bkv in (_ints(args.block_kv) or [64]) for st in (_ints(args.stages) or [2])]


def _hpp_variants(sweep, bs, sets, ref, kv_bytes, fp8):
    """Variants of the sweep in the script's form: name -> (fn, input sets, reference, KV bytes)."""
    variants = {}
    if not sweep:
        return variants
    pools = [("bf16", sets, ref, kv_bytes)]
    if fp8:
        f8 = jnp.float8_e4m3fn
        fp8_sets = [(q, k.astype(f8), v.astype(f8), t, l) for (q, k, v, t, l) in sets]
        ref8 = np.asarray(jax.jit(lambda *a: reference_decode_attention(*a, bs))(*fp8_sets[0]))
        pools.append(("fp8", fp8_sets, ref8, kv_bytes // 2))
    for pool, psets, pref, pbytes in pools:
        for n, bkv, st in sweep:
            kw = dict(heads_per_program=n, block_kv=bkv, max_concurrent_steps=st)
            name = f"mosaic hpp {pool} heads_per_program={n},block_kv={bkv},stages={st}"
            variants[name] = (
                jax.jit(lambda q, k, v, t, l, kw=kw: paged_decode_attention(q, k, v, t, l, bs, **kw)),
                psets, pref, pbytes,
            )
    return variants


if __name__ == "__main__":
    main()
