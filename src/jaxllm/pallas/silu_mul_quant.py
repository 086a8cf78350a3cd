"""An FP8 x FP8 MLP's middle in one kernel (Pallas, Triton backend): the gate/up product's scaling,
silu(gate) * up, and the per-token FP8 quantization of the result for the down projection.

Why: under ``quantization="fp8-w8a8"`` a call of >= 64 tokens runs the gate/up projection as an FP8
GEMM whose float32 result XLA scales (per token x per channel), rounds, and multiplies as
silu(gate) * up in one fusion, then takes each token's absolute maximum in a second kernel and
converts to float8 in a third: 22.5 + 2.7 + 5.3 us a layer at 256 rows on an H100, ~11% of the
decode step (BENCHMARKS.md "Eleventh session"). Here each token's row is one program that reads
the float32 product (at once where the row fits in registers, else twice: its max, then its
values) and writes the float8 row and its scale: ~29 MB read at 256 rows. On by default on NVIDIA
GPUs (JAXLLM_FUSED_SILU_QUANT=0 turns it off): the unrolled form takes 65 us at 1024 rows and 21 at
256 against XLA's 92 and 31 on an H100; the looped form (rows of > 16 blocks) measured slower than
XLA's path alone (BENCHMARKS.md "Twelfth session").

Numerics: the model's (models/quant.py: _fp8_matmul, then qeinsum's silu_mul) all in float32 --
gate and up scaled, silu(gate) * up, quantized by amax / 448 per token -- without the model's
roundings to bfloat16 in between, which XLA itself may drop (it keeps excess precision by
default), so the jnp path's exact bits are not defined to match.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from ..kv_cache_config import FP8_MAX  # float8_e4m3fn's largest finite value


def block_for(f: int) -> int | None:
    """The widest power-of-two block (<= 2048, >= 128) that divides f, or None (XLA's path)."""
    return next((b for b in (2048, 1024, 512, 256, 128) if f % b == 0), None)


def reference_silu_mul_quant(y, x_scale, w_scale):
    """(float8 h [M, F], float32 scale [M]) in plain jnp: y [M, 2F] float32 (gate, then up: an FP8
    GEMM's unscaled product), x_scale [M] per token, w_scale [2F] per channel; h = silu(gate) * up
    in float32, quantized per token."""
    f = y.shape[-1] // 2
    gu = y * x_scale[:, None] * w_scale[None, :]
    g, u = gu[:, :f], gu[:, f:]
    return quantize_rows(g * jax.nn.sigmoid(g) * u)


def quantize_rows(xf):
    """(float8_e4m3fn q, float32 scale [...]) of float32 rows xf [..., K], quantized per row (per
    token) as the FP8 x FP8 projections take them: scale = max(|row|) / 448, q = row / scale."""
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), 1e-12) / FP8_MAX
    return jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale


MAX_UNROLL = 16  # blocks of a row held in registers at once (F <= 32768 at 2048 a block)


def rows_for(m: int, f: int) -> int:
    """Rows per program for an [m, 2f] product: JAXLLM_SILU_ROWS (a power of two, default 1; an A/B
    switch: 2 and 4 timed no faster on an H100, alone at 64-1024 rows and in 1000 x 128/128,
    BENCHMARKS.md "Sixteenth session") where it divides m and the row's blocks are unrolled, else 1."""
    value = os.environ.get("JAXLLM_SILU_ROWS", "1")
    if not (value.isdigit() and 0 < int(value) <= 16 and int(value) & (int(value) - 1) == 0):
        raise ValueError(f"JAXLLM_SILU_ROWS={value!r}: expected a power of two from 1 to 16")
    rows = int(value)
    block = block_for(f)
    unrolled = block is not None and f // block <= MAX_UNROLL
    return rows if unrolled and m % rows == 0 else 1


@functools.partial(jax.jit, static_argnames=("num_warps", "unroll", "rows", "interpret"))
def silu_mul_quant(y, x_scale, w_scale, *, num_warps: int | None = None, unroll: bool | None = None,
                   rows: int = 1, interpret: bool = False):
    """y [M, 2F] float32 / bfloat16 / float16 (read as it is, computed in float32), x_scale [M],
    w_scale [2F] -> (h float8_e4m3fn [M, F], scale float32 [M]):
    reference_silu_mul_quant in one kernel, one program per row.

    `unroll` (default: where the row has at most MAX_UNROLL blocks): the row's blocks are loaded
    all at once and kept in registers between its maximum and its quantization (y read once, the
    loads in flight together); else a loop over the blocks twice (the maximum, then the values,
    re-read). The loop form ran slower than XLA's three kernels on an H100 (38.5 vs 31.2 us at 256
    rows, 31.6 vs 21.9 at 64: each program's loads one block at a time; BENCHMARKS.md "Eleventh
    session"); the unrolled form ran faster (21.4 at 256 rows, 65.2 vs 91.6 at 1024; "Twelfth
    session"). num_warps: 16 unrolled, 8 looped by default.

    `rows` (a power of two dividing M; default 1): rows per program. Each program reads all of
    w_scale (2F float32: 115 KB at Llama-3.1-8B's width, twice a bf16 row's bytes) from L2, so at
    one row a program the scale traffic is two thirds of what passes through L2; R rows a program
    share each scale block's load and hold R rows' h in registers (the unrolled form only)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, two_f = y.shape
    f = two_f // 2
    block = block_for(f) if two_f % 2 == 0 else None
    if block is None or x_scale.shape != (m,) or w_scale.shape != (two_f,):
        raise ValueError(f"silu_mul_quant: y {y.shape}, x_scale {x_scale.shape}, w_scale {w_scale.shape}: expected "
                         "[M, 2F], [M], [2F] with F a multiple of 128")
    steps = f // block
    unroll = steps <= MAX_UNROLL if unroll is None else unroll
    if rows < 1 or rows & (rows - 1) or m % rows or (rows > 1 and not unroll):
        raise ValueError(f"silu_mul_quant: rows={rows} must be a power of two dividing M={m}, and 1 where the "
                         f"row's {steps} blocks are looped over (more than {MAX_UNROLL}, or unroll=False)")
    num_warps = num_warps or (16 if unroll else 8)
    f32 = jnp.float32

    def kernel(y_ref, xs_ref, ws_ref, h_ref, s_ref):
        i = pl.program_id(0)
        # one row: 1-D blocks and a scalar maximum; R rows: [R, block] blocks, a maximum per row
        r = i if rows == 1 else pl.ds(i * rows, rows)
        xs = xs_ref[...].astype(f32)  # [R]
        xs = xs if rows == 1 else xs[:, None]

        def row_max(h):
            return jnp.max(jnp.abs(h)) if rows == 1 else jnp.max(jnp.abs(h), axis=-1, keepdims=True)

        def h_block(off):  # silu(gate) * up of the block at offset `off`, in float32
            g = y_ref[r, pl.ds(off, block)].astype(f32) * xs * ws_ref[pl.ds(off, block)]
            u = y_ref[r, pl.ds(f + off, block)].astype(f32) * xs * ws_ref[pl.ds(f + off, block)]
            return g * jax.nn.sigmoid(g) * u

        def store(off, h, scale):
            h_ref[r, pl.ds(off, block)] = jnp.clip(h / scale, -FP8_MAX, FP8_MAX).astype(h_ref.dtype)

        if unroll:
            hs = [h_block(j * block) for j in range(steps)]
            amax = functools.reduce(jnp.maximum, [row_max(h) for h in hs])
            scale = jnp.maximum(amax, 1e-12) / FP8_MAX
            for j, h in enumerate(hs):
                store(j * block, h, scale)
        else:
            def at(j):
                return pl.multiple_of(j * block, block)

            amax = jax.lax.fori_loop(0, steps, lambda j, a: jnp.maximum(a, row_max(h_block(at(j)))),
                                     jnp.zeros((), f32))
            scale = jnp.maximum(amax, 1e-12) / FP8_MAX
            jax.lax.fori_loop(0, steps, lambda j, c: store(at(j), h_block(at(j)), scale) or c, 0)
        s_ref[...] = jnp.full((1,), scale, f32) if rows == 1 else scale[:, 0]

    per_program = pl.BlockSpec((rows,), lambda i: (i,))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, f), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m,), f32)),
        grid=(m // rows,),
        in_specs=[pl.BlockSpec(), per_program, pl.BlockSpec()],  # y and w_scale whole: loads slice them
        out_specs=[pl.BlockSpec(), per_program],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(y if y.dtype in (jnp.bfloat16, jnp.float16) else y.astype(f32), x_scale.astype(f32), w_scale.astype(f32))
