"""The residual add and the RMSNorm after it, for a few rows, in one kernel (Pallas, Triton backend):
h = x + y, n = rmsnorm(h) * w -> (h, n).

Why: at batch 1 a decoder layer's two "add the block's output to the residual stream, normalize"
steps are, under XLA, three or four small kernels each (the add, a sum of squares that becomes
its own reduction at one row, the normalize, a convert), and a batch-1 step is ~20 kernels per
layer whose launches and gaps cost as much as their work (BENCHMARKS.md, sixth and ninth
sessions). Here each row is one program that reads x and y once and writes h and n. On by default
on NVIDIA GPUs (``JAXLLM_FUSED_NORM``, loader.fused_norm_wanted; models/llama.py): tp=2 batch 1
3.96 -> 3.84 ms on 2x H200, one H100 fp8 4.23 -> 4.17 ms (BENCHMARKS.md "Tenth session"). y may
also be a split-K projection's float32 partial sums [S, rows, e] (pallas.gemv partials=True), which
the kernel adds first: the projection's own epilogue kernel is then not needed.

Numerics are the model's own: h rounded to x's dtype as ``x + y`` rounds it, the mean of squares
and the normalize in float32, the product with the weight rounded once; only the order of the sum
of squares differs from XLA's reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..kv_cache_config import FP8_MAX  # float8_e4m3fn's largest finite value

MAX_ROWS = 16  # decode-sized calls; more rows stay with XLA, which fuses a many-row norm well


def add_rmsnorm_fits(rows: int, e: int) -> bool:
    """Whether the kernel serves [rows, e] (a Triton block is a power of two wide)."""
    return 1 <= rows <= MAX_ROWS and add_rmsnorm_quant_fits(e)


def add_rmsnorm_quant_fits(e: int) -> bool:
    """Whether add_rmsnorm_quant serves rows of e (any number of rows); add_rmsnorm's width too."""
    return 64 <= e <= 16384 and e & (e - 1) == 0


def _residual(x, y, dtype):
    """A kernel's h = x + y (a row block), y rounded to x's dtype first, as the model's add rounds."""
    return (x.astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)


def _normed(h, w, eps: float):
    """A kernel's RMSNorm(h) * w for a row block h [1, e], in float32 (the caller rounds it)."""
    hf = h.astype(jnp.float32)
    n = hf * jax.lax.rsqrt(jnp.sum(hf * hf, axis=-1, keepdims=True) / h.shape[-1] + eps)
    return n * w.astype(jnp.float32)[None, :]


def reference_add_rmsnorm(x, y, w, eps: float):
    """(x + y, RMSNorm(x + y) * w) in plain jnp, as models/llama.py computes them; y [S, rows, e]:
    float32 partial sums (a split-K projection's), added in float32 and rounded first."""
    if y.ndim == 3:
        y = jnp.sum(y.astype(jnp.float32), axis=0)
    h = x + y.astype(x.dtype)
    hf = h.astype(jnp.float32)
    n = hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + eps)
    return h, (n * w.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rmsnorm(x, y, w, *, eps: float, num_warps: int = 8, interpret: bool = False):
    """x, y [rows, e] (y of any float dtype, rounded to x's first), w [e] -> (h, n), both x's dtype.
    y may also be [S, rows, e]: float32 partial sums of the projection that made it (a split-K
    gemv's, pallas.gemv partials=True), added here in float32 and then rounded -- so the split-K
    epilogue kernel after that projection is not needed."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    rows, e = x.shape
    parts = y.ndim == 3
    if not add_rmsnorm_fits(rows, e) or y.shape[parts:] != x.shape or w.shape != (e,):
        raise ValueError(f"add_rmsnorm: x {x.shape}, y {y.shape}, w {w.shape}: expected [rows, e], [(S,) rows, e], [e] "
                         f"with rows <= {MAX_ROWS} and e a power of two in [64, 16384]")
    dtype = x.dtype

    def kernel(x_ref, y_ref, w_ref, h_ref, n_ref):
        y = jnp.sum(y_ref[...].astype(jnp.float32), axis=0) if parts else y_ref[...]  # [1, e]
        h = _residual(x_ref[...], y, dtype)
        h_ref[...] = h
        n_ref[...] = _normed(h, w_ref[...], eps).astype(dtype)

    row = pl.BlockSpec((1, e), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((rows, e), dtype),) * 2,
        grid=(rows,),
        in_specs=[row, pl.BlockSpec((y.shape[0], 1, e), lambda i: (0, i, 0)) if parts else row,
                  pl.BlockSpec((e,), lambda i: (0,))],
        out_specs=[row, row],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(x, y, w)


def reference_add_rmsnorm_quant(x, y, w, eps: float):
    """(h, q, scale) in plain jnp as the model computes them without the kernel: h = x + y (x when y
    is None), n = RMSNorm(h) * w rounded to x's dtype, then quantized per row for an FP8 x FP8
    projection (models/quant.py: _fp8_matmul): scale = max(|n|) / 448, q = n / scale in fp8."""
    from .silu_mul_quant import quantize_rows

    h, n = (x, reference_add_rmsnorm(x, jnp.zeros_like(x), w, eps)[1]) if y is None else reference_add_rmsnorm(x, y, w, eps)
    return h, *quantize_rows(n.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rmsnorm_quant(x, y, w, *, eps: float, num_warps: int = 8, interpret: bool = False):
    """x [rows, e], y [rows, e] or None, w [e] -> (h [rows, e] x's dtype, q [rows, e] float8_e4m3fn,
    scale [rows] float32): reference_add_rmsnorm_quant in one kernel, one program per row -- the
    residual add, the RMSNorm and the per-token FP8 quantization of an fp8-w8a8 projection's input
    (XLA runs them as 3-4 kernels: at 1024 rows ~19 us where the bytes take ~8 on an H100, BENCHMARKS.md
    "Twelfth session"). With y None (the first layer) only the norm and the quantization, h is x."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    rows, e = x.shape
    if not add_rmsnorm_quant_fits(e) or (y is not None and y.shape != x.shape) or w.shape != (e,):
        raise ValueError(f"add_rmsnorm_quant: x {x.shape}, y {None if y is None else y.shape}, w {w.shape}: expected "
                         "[rows, e], [rows, e] or None, [e] with e a power of two in [64, 16384]")
    dtype, f32 = x.dtype, jnp.float32

    def body(h, w_ref, q_ref, s_ref):
        nf = _normed(h, w_ref[...], eps).astype(dtype).astype(f32)  # rounded as the model's norm
        scale = jnp.maximum(jnp.max(jnp.abs(nf)), 1e-12) / FP8_MAX
        q_ref[...] = jnp.clip(nf / scale, -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        s_ref[...] = jnp.full((1,), scale, f32)

    def add_kernel(x_ref, y_ref, w_ref, h_ref, q_ref, s_ref):
        h = _residual(x_ref[...], y_ref[...], dtype)
        h_ref[...] = h
        body(h, w_ref, q_ref, s_ref)

    def norm_kernel(x_ref, w_ref, q_ref, s_ref):
        body(x_ref[...], w_ref, q_ref, s_ref)

    row, one, whole = pl.BlockSpec((1, e), lambda i: (i, 0)), pl.BlockSpec((1,), lambda i: (i,)), pl.BlockSpec((e,), lambda i: (0,))
    q_s = (jax.ShapeDtypeStruct((rows, e), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((rows,), f32))
    params = dict(grid=(rows,), compiler_params=pltriton.CompilerParams(num_warps=num_warps), interpret=interpret)
    if y is None:
        q, s = pl.pallas_call(norm_kernel, out_shape=q_s, in_specs=[row, whole], out_specs=[row, one], **params)(x, w)
        return x, q, s
    return pl.pallas_call(add_kernel, out_shape=(jax.ShapeDtypeStruct((rows, e), dtype), *q_s),
                          in_specs=[row, row, whole], out_specs=[row, row, one], **params)(x, y, w)
