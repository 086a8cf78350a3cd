"""Weight-only quantized projections: how one is stored, made and multiplied.

A quantized projection keeps its weight in the layout and logical axes of the plain one (so the
weight map and the sharding rules are unchanged), in ``float8_e4m3fn`` or ``int8``, beside a float32
``<name>_scale`` of one value per output channel, whose logical axes are the weight's output axes.
The matmul dequantizes inside the dot: ``einsum(x, w.astype(x.dtype)) * scale``, which XLA fuses
into one kernel (the weight is read from memory in 8 bits: the point of weight-only quantization
at decode sizes). Both casts are exact: every float8_e4m3fn and int8 value is a bfloat16 value.

Scales are symmetric per output channel: amax over the contracting dims / 448 (float8_e4m3fn's
largest finite value) or / 127 (int8, rounded to nearest). A per-tensor scale of a pre-quantized
checkpoint is the same scale repeated over the channels.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

WEIGHT_DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}


def weight_dtype(quantization: str | None, dtype):
    """The dtype a projection's weight is stored in."""
    return dtype if quantization is None else WEIGHT_DTYPES[quantization]


def scale_param(shape, axes, out_axes) -> nnx.Param:
    """The float32 scale of a quantized weight of this shape: one value per output channel."""
    scale_shape = tuple(n for n, a in zip(shape, axes) if a in out_axes)
    return nnx.Param(jnp.ones(scale_shape, jnp.float32), axes=tuple(out_axes), init="ones")


def qeinsum(spec: str, x, w, scale=None):
    """einsum(spec, x, w) for a plain or a quantized weight (dequantized inside the dot); the
    scale's dims are the trailing (output) dims of the result."""
    if scale is None:
        return jnp.einsum(spec, x, w)
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def quantize_weight(w, quantization: str, axes, out_axes):
    """(quantized weight, float32 scale per output channel) of a full-precision weight.

    The amax is taken over the contracting dims (the axes not in out_axes); under jit on a sharded
    weight that is a max over the whole (global) dims, whatever the sharding."""
    reduce = tuple(i for i, a in enumerate(axes) if a not in out_axes)
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=reduce, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX[quantization], 1.0)
    q = wf / scale
    if quantization == "int8":
        q = jnp.round(q)
    q = jnp.clip(q, -QMAX[quantization], QMAX[quantization])
    return q.astype(WEIGHT_DTYPES[quantization]), jnp.squeeze(scale, reduce)


def dequantize_weight(q, scale, axes, out_axes):
    """float32 weight from a quantized one and its per-output-channel scale (tests, references)."""
    shape = [n if a in out_axes else 1 for n, a in zip(q.shape, axes)]
    return q.astype(jnp.float32) * jnp.reshape(scale, shape)
