"""How XLA's row reduction reads a one-row gemv's bytes faster than pallas.gemv (seventeenth
session: down 20.0 vs 21.8 us, o 7.0 vs 7.9, gate/up 38.6-40.0 vs 41.1 for the same fp8 bytes):
each kernel's launch shape as the profiler records it (grid, block, registers, shared memory) and,
for XLA's kernels, what the PTX it compiled does (threads per block, vector loads, unrolling):

    PYTHONPATH=src python benchmarks/launch_shapes.py [--dump /tmp/xla-dump] [--shapes down o]

A Triton kernel shaped like XLA's (its rows a block, bytes a thread, loads in flight) is the next
thing to try where the ~400 pallas.gemv tilings swept so far stop (BENCHMARKS.md "Nineteenth
session").
"""
import argparse, glob, json, os, re, shutil, statistics, sys

SHAPES = {"gate/up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}


def summarize(events):
    """{kernel name: (median µs, count, the launch args of its first event)}."""
    by = {}
    for e in events:
        by.setdefault(e["name"], []).append(e)
    return {n: (statistics.median(x["dur"] for x in es), len(es),
                {k: v for k, v in es[0].get("args", {}).items() if not k.startswith(("correlation", "group"))})
            for n, es in by.items()}


def ptx_shape(dump: str, kernel: str) -> dict:
    """What the dumped PTX of XLA's kernel `kernel` does: threads per block, vector loads, unroll."""
    for path in sorted(glob.glob(os.path.join(dump, "*.ptx")), key=os.path.getmtime, reverse=True):
        text = open(path).read()
        m = re.search(rf"\.entry {re.escape(kernel)}\(.*?\n}}\n", text, re.S)
        if m:
            body = m.group(0)
            return {"ptx": os.path.basename(path),
                    "maxntid": re.findall(r"\.(?:maxntid|reqntid) ([\d, ]+)", body),
                    "global loads": {k: len(re.findall(rf"ld\.global[\w.]*\.{k}\.", body)) for k in ("v4", "v2")}
                                    | {"scalar": len(re.findall(r"ld\.global(?![\w.]*\.v[24]\.)", body))},
                    "shuffles": len(re.findall(r"shfl\.sync", body)), "branches": len(re.findall(r"\bbra\b", body)),
                    "lines": body.count("\n")}
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default="/tmp/xla-dump")
    ap.add_argument("--shapes", nargs="+", default=["down", "o"], choices=list(SHAPES))
    ap.add_argument("--json")
    a = ap.parse_args()
    shutil.rmtree(a.dump, ignore_errors=True)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={a.dump}").strip()
    import jax, jax.numpy as jnp

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.join(here, "..", "src")]
    from gemv_probe import gpu_events  # (benchmarks/gemv_probe.py; imports JAX, so after XLA_FLAGS)
    from jaxllm.pallas.gemv import gemv, gemv_tiling

    out = {}
    for name in a.shapes:
        k, n = SHAPES[name]
        w = (0.05 * jax.random.normal(jax.random.key(0), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
        wu = jax.lax.bitcast_convert_type(w.reshape(n, k // 4, 4), jnp.uint32)
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
        scale = jnp.ones((n,), jnp.float32)
        t = gemv_tiling(1, k, n, 1, True)  # the models' default (its keys are gemv's arguments)
        runs = {"xla row sum (uint32 view)": (jax.jit(lambda w: jnp.sum(w, axis=1)), (wu,)),
                f"pallas.gemv {t}": (jax.jit(lambda x, w: gemv(x, w, scale, k_minor=True, partials=True, **t)), (x, w))}
        for label, (f, args) in runs.items():
            kern = summarize(gpu_events(f, args, reps=5, tdir="/tmp/launch-trace"))
            for kname, (us, cnt, kargs) in kern.items():
                shape = ptx_shape(a.dump, kname)  # {} where the dump has no PTX of it
                out[f"{name} | {label} | {kname}"] = dict(us=us, count=cnt, launch=kargs, ptx=shape)
                print(f"{name:8} {label:48} {kname:36} {us:7.2f} us x{cnt}\n    launch {kargs}\n    ptx {shape}",
                      flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
