"""What bounds the one-row fp8 gemv? Variants of its kernel at Llama-3.1-8B's shapes, each timed by
the profiler (device time, median per call):

    PYTHONPATH=src python benchmarks/gemv_probe.py [OUT.json]

kinds: fma (the models' kernel shape: fp8 -> f32 multiply-adds, a reduction per block), probe (the
same tiles read as uint32 and summed: the access pattern's read ceiling), *_t (the weight stored
pre-tiled, each step's tile one contiguous run), *_ef (loads with evict_first), pers (a program
walks `per` column blocks in one flat loop), xla_rowsum / xla_gemv / xla_dot (XLA's row reduction
of the same bytes, the product as XLA's fused reduction, XLA's converting dot). The variant list in
main() is the last one run (BENCHMARKS.md "Seventeenth session" has every run's table).
"""
import glob, gzip, json, os, shutil, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def build(kind, k, n, bn, bk, splits, nw, ns, per=1, interpret=False):
    steps = k // (splits * bk)
    probe = kind.startswith("probe")
    tiled = kind.endswith("_t")
    bkk = bk // 4 if probe else bk
    blocks = n // bn
    progs = blocks // per

    def kernel(x_ref, w_ref, o_ref):
        p, s = pl.program_id(0), pl.program_id(1)

        def body(t, acc):
            b, i = jax.lax.div(t, steps), jax.lax.rem(t, steps)
            j = p + b * progs  # round-robin blocks
            cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
            off = pl.multiple_of((s * steps + i) * bkk, bkk)
            if tiled:  # w [N / bn, K / bk, bn, bk]: each step's tile one contiguous run
                ws = w_ref[j, s * steps + i, :, :]
            elif "_ef" in kind:
                ws = pltriton.load(w_ref.at[cols, pl.ds(off, bkk)], eviction_policy="evict_first")
            elif "_cg" in kind:
                ws = pltriton.load(w_ref.at[cols, pl.ds(off, bkk)], cache_modifier="cg")
            else:
                ws = w_ref[cols, pl.ds(off, bkk)]
            acc = acc * (i > 0).astype(jnp.float32)  # a new block starts from zero
            if probe:
                acc = acc + jnp.sum(ws, axis=1)[None].astype(jnp.float32)
            else:
                xo = pl.multiple_of((s * steps + i) * bk, bk)
                xs = x_ref[0, pl.ds(xo, bk)].astype(jnp.float32)
                acc = acc + jnp.sum(ws.astype(jnp.float32) * xs[None, :], axis=1)[None]
            if per > 1:
                o_ref[pl.ds(s, 1), :, cols] = acc[None]
            return acc

        acc = jax.lax.fori_loop(0, per * steps, body, jnp.zeros((1, bn), jnp.float32))
        if per == 1:
            o_ref[pl.ds(s, 1), :, pl.ds(pl.multiple_of(p * bn, bn), bn)] = acc[None]

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, 1, n), jnp.float32), grid=(progs, splits),
                          in_specs=[pl.BlockSpec(), pl.BlockSpec()], out_specs=pl.BlockSpec(),
                          compiler_params=pltriton.CompilerParams(num_warps=nw, num_stages=ns), interpret=interpret)


def gpu_kernels(f, args, reps=3, tdir="/tmp/probe-trace"):
    """(name, device µs) of every GPU kernel of `reps` calls of f (after two warm-up calls), by the profiler."""
    return [(e["name"], e["dur"]) for e in gpu_events(f, args, reps, tdir)]


def gpu_events(f, args, reps=3, tdir="/tmp/probe-trace"):
    """The profiler's trace events (name, dur, args: the launch shape) of every GPU kernel of `reps`
    calls of f, after two warm-up calls."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    shutil.rmtree(tdir, ignore_errors=True)
    with jax.profiler.trace(tdir, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(f(*args))
    path = glob.glob(os.path.join(tdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    tr = json.load(gzip.open(path))
    ev = tr["traceEvents"] if isinstance(tr, dict) else tr
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [e for e in ev if e.get("ph") == "X" and "/device:GPU" in procs.get(e["pid"], "")]


def device_us(f, args, reps=3, tdir="/tmp/probe-trace", names=("kernel",)):
    """The median device time of f's kernels whose names start with `names`, and how many there were."""
    durs = [d for n, d in gpu_kernels(f, args, reps, tdir) if n.startswith(names) and d > 2]
    return statistics.median(durs) if durs else float("nan"), len(durs)


def main():
    rows = []
    shapes = {"gate/up": (4096, 28672, 6), "down": (14336, 4096, 10), "qkv": (4096, 6144, 20), "o": (4096, 4096, 20)}
    for name, (k, n, copies) in shapes.items():
        ws = [(0.05 * jax.random.normal(jax.random.key(c), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
              for c in range(copies)]
        wu = [jax.lax.bitcast_convert_type(w.reshape(n, k // 4, 4), jnp.uint32) for w in ws]
        x = jax.random.normal(jax.random.key(99), (1, k), jnp.bfloat16)
        ref = np.asarray(jnp.einsum("k,nk->n", x[0].astype(jnp.float32), ws[0].astype(jnp.float32)))
        blocks32 = n // 32
        dsplit = 1
        while blocks32 * dsplit < 264 and (k // 512) % (2 * dsplit) == 0 and (k // 512) // (2 * dsplit) >= 2:
            dsplit *= 2
        variants = [("fma", 32, 512, dsplit, 4, 4, 1), ("probe", 32, 512, dsplit, 4, 4, 1),
                    ("fma_t", 32, 512, dsplit, 4, 4, 1), ("probe_t", 32, 512, dsplit, 4, 4, 1),
                    ("fma", 32, 512, dsplit, 8, 4, 1), ("fma_t", 32, 512, dsplit, 8, 4, 1),
                    ("fma_t", 32, 512, dsplit, 4, 3, 1), ("fma_t", 32, 512, dsplit, 4, 6, 1),
                    ("fma_t", 16, 1024, dsplit, 4, 4, 1), ("probe_t", 16, 1024, dsplit, 4, 4, 1),
                    ("fma_t", 64, 256, dsplit, 4, 4, 1), ("fma_t", 32, 1024, dsplit, 8, 3, 1),
                    ("fma_t", 32, 512, dsplit * 2, 4, 4, 1), ("fma", 32, 512, dsplit * 2, 4, 4, 1)]
        variants = [("fma", 32, 512, dsplit, 4, 4, 1), ("xla_rowsum", 0, 0, 1, 0, 0, 1),
                    ("xla_gemv", 0, 0, 1, 0, 0, 1), ("xla_gemv_scaled", 0, 0, 1, 0, 0, 1), ("xla_dot", 0, 0, 1, 0, 0, 1),
                    ("fma", 8, 2048, 1, 4, 4, 1), ("fma", 8, 1024, 1, 2, 4, 1), ("fma", 4, 4096, 1, 4, 4, 1),
                    ("fma", 16, 1024, 1, 4, 4, 1), ("fma", 32, 512, 1, 4, 4, 1)]
        for kind, bn, bk, splits, nw, ns, per in variants:
            if kind.startswith("xla"):
                sc = jnp.linspace(0.5, 1.5, n)
                red = {"xla_rowsum": lambda x, w: jnp.sum(w, axis=1),
                       "xla_gemv": lambda x, w: jnp.sum(w.astype(jnp.float32) * x[0].astype(jnp.float32)[None, :], axis=1),
                       "xla_gemv_scaled": lambda x, w: (jnp.sum(w.astype(jnp.float32) * x[0].astype(jnp.float32)[None, :],
                                                                axis=1) * sc).astype(jnp.bfloat16),
                       "xla_dot": lambda x, w: jnp.einsum("mk,nk->mn", x, w.astype(x.dtype),
                                                          preferred_element_type=jnp.float32)}[kind]
                f = jax.jit(lambda x, ws: [red(x, w) for w in ws])
                args = (x, wu if kind == "xla_rowsum" else ws)
                err = 0.0
                if kind != "xla_rowsum":
                    got = np.asarray(f(*args)[0], np.float32).reshape(-1)
                    if kind == "xla_gemv_scaled":
                        got = got / np.asarray(sc)
                    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                us, cnt = device_us(f, args, names=("input_", "loop_", "reduce", "fusion", "gemm", "cutlass", "sm90", "triton"))
                print(f"{name:8} {kind:16} {us:6.1f} us {n * k / (us * 1e-6) / 1e9:6.0f} GB/s err {err:.1e} ({cnt} kernels)",
                      flush=True)
                continue
            if k % (splits * bk):
                continue
            try:
                call = build(kind, k, n, bn, bk, splits, nw, ns, per)
                f = jax.jit(lambda x, ws: [call(x, w) for w in ws])
                wsel = wu if kind.startswith("probe") else ws
                if kind.endswith("_t"):
                    kk = wsel[0].shape[1]
                    bkk = kk * bk // k
                    wsel = [w.reshape(n // bn, bn, kk // bkk, bkk).transpose(0, 2, 1, 3) for w in wsel]
                    wsel = [jnp.asarray(np.asarray(w)) for w in wsel]  # materialized in the tiled layout
                args = (x, wsel)
                out = f(*args)
                err = 0.0
                if kind != "probe":
                    got = np.asarray(jnp.sum(out[0], axis=(0, 1)))
                    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                us, cnt = device_us(f, args)
                gbs = n * k / (us * 1e-6) / 1e9
                r = dict(shape=name, kind=kind, bn=bn, bk=bk, splits=splits, nw=nw, ns=ns, per=per, us=us, gbs=gbs, err=err)
                rows.append(r)
                print(f"{name:8} {kind:5} bn={bn:3} bk={bk:5} sp={splits:2} nw={nw} ns={ns} per={per}  {us:6.1f} us "
                      f"{gbs:6.0f} GB/s err {err:.1e} ({cnt} kernels)", flush=True)
            except Exception as e:
                print(f"{name:8} {kind:5} bn={bn} bk={bk} sp={splits} nw={nw} ns={ns} per={per}: {type(e).__name__} "
                      f"{str(e)[:300]}", flush=True)
    if len(sys.argv) > 1:
        json.dump(rows, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
