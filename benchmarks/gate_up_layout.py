"""Does batch 1's gate/up gemv (returning silu(gate) * up, pallas.gemv out_act) pay for reading its
2 gate rows and 2 up rows from two places? The seventeenth session timed it at 42.4 us against
41.0 for the plain product of 4 contiguous rows. Here, at Llama-3.1-8B's fp8 gate/up (28672 x 4096):

    PYTHONPATH=src python benchmarks/gate_up_layout.py

- "out_act, [gate; up]": the models' kernel (pallas.gemv out_act="silu_mul", its default tiling);
- "out_act, interleaved": the same arithmetic on the weight stored in blocks of 2 gate rows then 2
  up rows (each program reads one contiguous 16 KiB run), checked equal to the first;
- "plain, 4 rows": the product alone, 4 whole rows a program (the read this would match).
Device time by the profiler (median per call over 6 weight copies).
"""
import os, sys

import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_probe import device_us  # noqa: E402  (benchmarks/gemv_probe.py)
from jaxllm.pallas.gemv import _silu_times, gemv, gemv_tiling  # noqa: E402

K, F = 4096, 14336


def interleave(w, bn=2):
    """[gate; up] rows [2F, K] -> blocks of bn gate rows then bn up rows."""
    g, u = w[:F].reshape(F // bn, bn, K), w[F:].reshape(F // bn, bn, K)
    return jnp.stack([g, u], axis=1).reshape(2 * F, K)


def out_act_interleaved(x, w, scale, bn=2, num_warps=4, interpret=False):
    """silu(x @ gate.T) * (x @ up.T) [1, F] from the interleaved weight (pallas.gemv's out_act arithmetic)."""

    def kernel(x_ref, w_ref, s_ref, o_ref):
        j = pl.program_id(0)
        xs = x_ref[0, :].astype(jnp.float32)
        rows = (pl.ds(pl.multiple_of(2 * bn * j, 2 * bn), bn), pl.ds(pl.multiple_of(2 * bn * j + bn, bn), bn))
        g, u = (jnp.sum(w_ref[r, :].astype(jnp.float32) * xs[None, :], axis=1)[None] for r in rows)
        cols = pl.ds(pl.multiple_of(bn * j, bn), bn)
        g = g * s_ref[cols].astype(jnp.float32)[None]
        u = u * s_ref[pl.ds(pl.multiple_of(F + bn * j, bn), bn)].astype(jnp.float32)[None]
        o_ref[...] = _silu_times(g.astype(o_ref.dtype), u.astype(o_ref.dtype), o_ref.dtype)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, F), x.dtype), grid=(F // bn,),
                          in_specs=[pl.BlockSpec()] * 3, out_specs=pl.BlockSpec((1, bn), lambda j: (0, j)),
                          compiler_params=pltriton.CompilerParams(num_warps=num_warps), interpret=interpret)(x, w, scale)


def main():
    copies = 6
    ws = [(0.05 * jax.random.normal(jax.random.key(c), (2 * F, K), jnp.float32)).astype(jnp.float8_e4m3fn)
          for c in range(copies)]
    wi = [interleave(w) for w in ws]
    scale = jnp.linspace(0.5, 1.5, 2 * F, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(99), (1, K), jnp.bfloat16)
    t_act = {k: v for k, v in gemv_tiling(1, K, 2 * F, 1, True, out_act="silu_mul").items()}
    t_plain = {k: v for k, v in gemv_tiling(1, K, 2 * F, 1, True).items()}
    runs = {
        "out_act, [gate; up]": (jax.jit(lambda x, ws: [gemv(x, w, scale, k_minor=True, out_act="silu_mul", **t_act)
                                                       for w in ws]), ws),
        "out_act, interleaved": (jax.jit(lambda x, ws: [out_act_interleaved(x, w, scale) for w in ws]), wi),
        "plain, 4 rows": (jax.jit(lambda x, ws: [gemv(x, w, scale, k_minor=True, **t_plain) for w in ws]), ws),
    }
    ref = np.asarray(runs["out_act, [gate; up]"][0](x, ws)[0], np.float32)
    print(f"{'kernel':24} {'us':>7}  same as [gate; up]")
    for name, (f, w) in runs.items():
        out = f(x, w)
        same = "" if name.startswith("plain") else str(np.array_equal(np.asarray(out[0], np.float32), ref))
        us, _ = device_us(f, (x, w))
        print(f"{name:24} {us:7.2f}  {same}", flush=True)


if __name__ == "__main__":
    main()
