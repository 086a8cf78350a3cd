"""Quantized projections: how one is stored, made and multiplied.

A quantized projection keeps its weight in ``float8_e4m3fn`` or ``int8`` beside a float32
``<name>_scale`` of one value per output channel, whose logical axes are the weight's output axes.

int8 weights keep the layout and logical axes of the plain ones (``[in..., out...]``) and multiply
weight-only: ``einsum(x, w.astype(x.dtype)) * scale`` (the cast is exact: every int8 value is a
bfloat16 value).

fp8 weights are stored **K-minor**, ``[out..., in...]`` (PyTorch's own ``[out, in]`` layout, so a
pre-quantized checkpoint's tensor is placed as it is): cuBLASLt's FP8 GEMM takes both operands with
the contracting dimension innermost, and a weight in the other layout makes XLA transpose it on
every call (measured here earlier: slower than bf16). fp8 weights multiply weight-only as int8
does, unless the model asks for W8A8 (``LLM(quantization="fp8-w8a8")``): then calls of at least
``FP8_MATMUL_MIN_TOKENS`` tokens quantize the activations per token on the fly (amax / 448,
float8_e4m3fn) and multiply FP8 x FP8 with a float32 result before the per-token and per-channel
scales -- the path that doubles the matmul rate on Hopper; smaller (decode-sized) calls, where
reading the weight is the cost, stay weight-only.

Scales are symmetric per output channel: amax over the contracting dims / 448 (float8_e4m3fn's
largest finite value) or / 127 (int8, rounded to nearest). A per-tensor scale of a pre-quantized
checkpoint is the same scale repeated over the channels.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..switches import env_flag

WEIGHT_DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
QMAX = {"fp8": 448.0, "int8": 127.0}


def weight_dtype(quantization: str | None, dtype):
    """The dtype a projection's weight is stored in."""
    return dtype if quantization is None else WEIGHT_DTYPES[quantization]


def scale_param(shape, axes, out_axes) -> nnx.Param:
    """The float32 scale of a quantized weight of this shape: one value per output channel."""
    scale_shape = tuple(n for n, a in zip(shape, axes) if a in out_axes)
    return nnx.Param(jnp.ones(scale_shape, jnp.float32), axes=tuple(out_axes), init="ones")


# Calls of at least this many tokens (rows x positions) run FP8 x FP8 (W8A8); fewer, weight-only.
# Environment switch JAXLLM_FP8_MATMUL_MIN_TOKENS for A/B runs (1: batch-1 decode FP8 x FP8 too).
FP8_MATMUL_MIN_TOKENS = int(os.environ.get("JAXLLM_FP8_MATMUL_MIN_TOKENS", "64"))


def is_k_minor(quantization: str | None) -> bool:
    """Whether a projection quantized this way stores its weight [out..., in...] (see above)."""
    return quantization == "fp8"


def k_minor_order(axes, out_axes) -> tuple[int, ...]:
    """The permutation of a [in..., out...] weight's dims that puts it K-minor: out dims first."""
    return tuple(i for i, a in enumerate(axes) if a in out_axes) + tuple(i for i, a in enumerate(axes) if a not in out_axes)


def _k_minor_spec(spec: str) -> tuple[str, int]:
    """An einsum spec "x,w->y" rewritten for w stored K-minor (its output letters first), and the
    number of contracting dims."""
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    contracting = "".join(c for c in ws if c in xs)
    return f"{xs},{''.join(c for c in ws if c not in xs)}{contracting}->{out}", len(contracting)


class Partials(NamedTuple):
    """A projection's result as float32 split-K partial sums [S, ..., N] (scale applied), still to
    be added: what qeinsum returns with ``partials=True`` where pallas.gemv splits K at one row,
    for a consumer that adds them in its own kernel (models/llama.py: add_norm). `finish`: the one
    row's product still to run, ``PendingGemv`` -- for a consumer that runs it with its own
    epilogue instead (the residual add + RMSNorm, or the q/k/v projection's RoPE and KV writes)
    and leaves `parts` unused (XLA drops that kernel)."""

    parts: jax.Array
    finish: Any = None

    def total(self, dtype):
        """The projection's result, as the gemv's own epilogue adds it."""
        return jnp.sum(self.parts, axis=0).astype(dtype)


@jax.tree_util.register_pytree_node_class
class PendingGemv:
    """A one-row pallas.gemv product (x [1, K], w [N, K] or [K, N], scale [N] or None) for a
    consumer to run with its own epilogue: ``add_norm`` (the residual add + RMSNorm finished by the
    last program of the split-K gemv, pallas.gemv residual / norm_w; JAXLLM_GEMV_NORM_EPILOGUE=1),
    or pallas.rope_kv.gemv_rope_kv_write (runner/paged.py rope_attend) with x, w and scale. A
    pytree (the operands; the tiling static), so it may leave the layer's jit with the down
    projection's partials for the next layer's input norm."""

    def __init__(self, x, w, scale, static):
        self.x, self.w, self.scale, self.static = x, w, scale, static  # static: (k_minor, act, tiling items)

    def tree_flatten(self):
        return (self.x, self.w, self.scale), self.static

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(*children, static)

    def add_norm(self, residual, norm_w, eps):
        """(h, norm(h)) for h = residual [1, N] + the product, by the gemv's last program."""
        from ..pallas.gemv import gemv

        k_minor, act, tiling = self.static
        return gemv(self.x, self.w, self.scale, residual, norm_w, k_minor=k_minor, act=act, eps=eps,
                    interpret=jax.default_backend() == "cpu", **dict(tiling))


class Activated(NamedTuple):
    """A gate/up projection's silu(gate) * up [..., f], computed by the projection's kernel (what
    qeinsum returns with ``out_act="silu_mul"`` where pallas.gemv serves the call): the down
    projection reads it as it is, without an `act`."""

    value: jax.Array


class Scaled(NamedTuple):
    """An FP8 x FP8 product still to be scaled: `raw` [..., N] (float32, or the activations' 16-bit
    dtype) times `x_scale` (per token,
    broadcastable) times `w_scale` (per output channel) -- what qeinsum returns with ``raw=True``
    where it runs FP8 x FP8, for a consumer that scales it in its own kernel (the down projection's
    pallas.silu_mul_quant)."""

    raw: jax.Array
    x_scale: jax.Array
    w_scale: jax.Array
    dtype: Any  # the result's, once scaled

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    def value(self, dtype=None):
        """The product as _fp8_matmul returns it (in its dtype, or `dtype`)."""
        return (self.raw.astype(jnp.float32) * self.x_scale * self.w_scale).astype(dtype or self.dtype)


class Quantized(NamedTuple):
    """Activations already quantized per token for an FP8 x FP8 projection: fp8 `q` [..., K] and
    float32 `scale` [...] (q * scale ~ the activations), as pallas.add_norm.add_rmsnorm_quant makes
    them from the norm before the projection; `dtype`: the activations' own (the result's)."""

    q: jax.Array
    scale: jax.Array
    dtype: Any

    @property
    def shape(self) -> tuple:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def value(self):
        """The activations, dequantized (for a consumer that does not multiply FP8 x FP8)."""
        return (self.q.astype(jnp.float32) * self.scale[..., None]).astype(self.dtype)


def qeinsum(spec: str, x, w, scale=None, w8a8: bool = False, gemv: bool | str = False, out_dtype=None,
            act: str | None = None, partials: bool = False, raw: bool = False, out_act: str | None = None):
    """einsum(spec, x, w) for a plain or a quantized weight, spec written for the plain layout.

    x's contracting dims are its trailing ones and the scale's dims the trailing (output) dims of
    the result, as in every projection of the models here. int8: dequantized inside the dot; fp8
    (stored K-minor): with `w8a8`, FP8 x FP8 for calls of FP8_MATMUL_MIN_TOKENS tokens or more,
    else weight-only -- with `gemv` True, through the Pallas (Mosaic GPU) fp8 GEMV kernel where it
    serves the shape. `gemv` a ``pallas.gemv`` mode (ModelConfig.triton_gemv), through that kernel:
    "all" every weight-only decode-sized product (plain, int8, fp8) it serves; "small" those whose
    weight has at most ``pallas.gemv.SMALL_WEIGHT`` elements; "quantized" fp8 weights times one row.
    out_dtype: the result's (default x's; float32 for partial sums still to be added). `act`
    "silu_mul": x is [..., 2, f] (a gate/up output) and the product is of silu(gate) * up -- computed
    inside pallas.gemv where the call goes there, else here first (the model's own ops). `partials`:
    where pallas.gemv splits K at one row, return its float32 partial sums as ``Partials``.
    `out_act` "silu_mul" (a gate/up projection, result [..., 2, f]): where pallas.gemv serves the
    call, it returns silu(gate) * up as ``Activated`` [..., f]; elsewhere the product as usual.
    `raw`: where the call runs FP8 x FP8, return the product unscaled as ``Scaled`` (x's dtype
    stays the result's). x may be ``Quantized`` (quantized per token already, by the norm before
    the projection): multiplied FP8 x FP8 as it is, or dequantized where the call does not; with act, x may be ``Scaled`` (a gate/up output): FP8 x FP8 here goes
    through pallas.silu_mul_quant, else x is scaled first."""
    if isinstance(x, Scaled):
        if act == "silu_mul" and w.dtype == jnp.float8_e4m3fn and w8a8:
            return _silu_mul_fp8_matmul(spec, x, w, scale, out_dtype)
        x = x.value(out_dtype)
    if isinstance(x, Quantized):
        if act is None and w.dtype == jnp.float8_e4m3fn and w8a8:
            kspec, n_in = _k_minor_spec(spec)
            if n_in == 1 and math.prod(x.shape[:-1]) >= FP8_MATMUL_MIN_TOKENS:
                return _fp8_matmul(kspec, x, w, scale, n_in, out_dtype, raw)
        x = x.value()
    out_dtype = out_dtype or x.dtype
    k_minor = w.dtype == jnp.float8_e4m3fn
    if act is not None:
        if act != "silu_mul":
            raise ValueError(f"qeinsum: act={act!r}: expected None or 'silu_mul'")
        gspec = _k_minor_spec(spec)[0] if k_minor else spec
        y = plain_gemv(gspec, x, w, scale, k_minor, gemv, out_dtype, act, partials) if isinstance(gemv, str) else None
        if y is not None:
            return y
        x = jax.nn.silu(x[..., 0, :]) * x[..., 1, :]
    if k_minor:
        spec, n_in = _k_minor_spec(spec)
        tokens = math.prod(x.shape[: x.ndim - n_in])
        if w8a8 and tokens >= FP8_MATMUL_MIN_TOKENS:
            return _fp8_matmul(spec, x, w, scale, n_in, out_dtype, raw)
        if gemv is True:
            y = _fp8_gemv(spec, x, w, scale)
            if y is not None:
                return y.astype(out_dtype)
    if isinstance(gemv, str):
        y = plain_gemv(spec, x, w, scale, k_minor, gemv, out_dtype, partials=partials, out_act=out_act)
        if y is None and out_act is not None:  # the kernel does not serve the activation: the product alone
            y = plain_gemv(spec, x, w, scale, k_minor, gemv, out_dtype, partials=partials)
        if y is not None:
            return y
    if scale is None:
        return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)  # weight-only
    return (y * scale).astype(out_dtype)


def _fp8_matmul(spec: str, x, w, scale, n_in: int, out_dtype=None, raw: bool = False):
    """FP8 x FP8 einsum of x (its last n_in dims contracting), quantized per token (here, or
    already: ``Quantized``), and a K-minor fp8 weight with per-output-channel scale; in out_dtype
    (default x's), or with `raw` as ``Scaled`` (the product and both scales, not yet applied)."""
    if isinstance(x, Quantized):
        xq, x_scale = x.q, x.scale
    else:
        xf = x.astype(jnp.float32)
        amax = jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - n_in, x.ndim)), keepdims=True)
        x_scale = jnp.maximum(amax, 1e-12) / QMAX["fp8"]  # per token
        xq = jnp.clip(xf / x_scale, -QMAX["fp8"], QMAX["fp8"]).astype(jnp.float8_e4m3fn)
    # The product as the GEMM writes it (it accumulates in float32 either way): raw, for a kernel
    # that scales it, in x's dtype where that is 16-bit (half the bytes written by the GEMM and read
    # by the kernel: at 1024 rows the gate/up product is 117 MB in float32); scaled here, in the
    # result's dtype where that is 16-bit (the q/k/v, o and down products: ~58 MB a layer less
    # written and read at 1024 rows, ~470 MB a layer in an 8192-token prefill call), rounded once before
    # scaling as well as after (JAXLLM_FP8_PRODUCT_F32=1: in float32, the A/B). Else float32.
    if raw:
        acc = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    else:
        acc = _scaled_product_dtype(out_dtype or x.dtype)
    y = _fp8_product(spec, xq, x_scale, w, scale, n_in, out_dtype or x.dtype, acc)
    return y if raw else y.value()


def _scaled_product_dtype(result_dtype):
    """The dtype an FP8 x FP8 GEMM writes a product in that is scaled after it: the result's where
    that is 16-bit, else float32; JAXLLM_FP8_PRODUCT_F32=1: float32 always (the A/B)."""
    res = jnp.dtype(result_dtype)
    return res if res in (jnp.bfloat16, jnp.float16) and not env_flag("JAXLLM_FP8_PRODUCT_F32") else jnp.float32


def _fp8_product(spec: str, xq, x_scale, w, scale, n_in: int, dtype, acc_dtype=jnp.float32) -> Scaled:
    """The FP8 x FP8 einsum of per-token quantized xq (its last n_in dims contracting; x_scale one
    value per token) and a K-minor fp8 weight with per-output-channel scale, still to be scaled;
    the product in acc_dtype (the GEMM accumulates in float32 either way)."""
    batch = xq.shape[: xq.ndim - n_in]
    y = jnp.einsum(spec, xq, w, preferred_element_type=acc_dtype)
    return Scaled(y, x_scale.reshape(batch + (1,) * (y.ndim - len(batch))), scale, dtype)


def _silu_mul_fp8_matmul(spec: str, gu: Scaled, w, scale, out_dtype):
    """The down projection of silu(gate) * up for a gate/up product still to be scaled (gu.raw
    [..., 2, f], float32 or 16-bit): scaling, activation and per-token FP8 quantization in one
    pallas.silu_mul_quant kernel (Pallas interpret mode on a CPU backend), then FP8 x FP8 with the
    K-minor fp8 weight w; spec is written for silu(gate) * up's shape and the plain layout. Where
    the kernel does not serve the shape, the same steps in jnp."""
    from ..pallas.silu_mul_quant import block_for, rows_for, silu_mul_quant

    dtype = out_dtype or gu.dtype
    *batch, two, f = gu.raw.shape
    m = math.prod(batch)
    kspec, n_in = _k_minor_spec(spec)
    if two != 2 or n_in != 1 or block_for(f) is None:
        return qeinsum(spec, gu.value(dtype), w, scale, True, out_dtype=dtype, act="silu_mul")
    hq, h_scale = silu_mul_quant(gu.raw.reshape(m, 2 * f), jnp.broadcast_to(gu.x_scale, (*batch, 1, 1)).reshape(m),
                                 jnp.broadcast_to(gu.w_scale, (2, f)).reshape(2 * f), rows=rows_for(m, f),
                                 interpret=jax.default_backend() == "cpu")
    return _fp8_product(kspec, hq.reshape(*batch, f), h_scale, w, scale, n_in, dtype,
                        _scaled_product_dtype(dtype)).value()


def _as_2d(spec: str, x, w, k_minor: bool):
    """A projection as one 2-D product for the GEMV kernels: (x [m, k], w [k, n] -- or [n, k] with
    `k_minor`, spec rewritten for that layout --, the result's shape), or None where the result is
    not x's batch dims followed by w's output dims."""
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    n_in = sum(c in xs for c in ws)
    n_out = len(ws) - n_in
    if out != xs[: len(xs) - n_in] + (ws[:n_out] if k_minor else ws[n_in:]):
        return None
    batch, out_dims = x.shape[: x.ndim - n_in], (w.shape[:n_out] if k_minor else w.shape[n_in:])
    m, k, n = math.prod(batch), math.prod(x.shape[x.ndim - n_in:]), math.prod(out_dims)
    return x.reshape(m, k), w.reshape((n, k) if k_minor else (k, n)), batch + out_dims


def _fp8_gemv(spec: str, x, w, scale):
    """The weight-only product of a K-minor fp8 weight through ``pallas.fp8_gemv``, or None where the
    kernel does not serve the shape."""
    from ..pallas.fp8_gemv import fp8_gemv, gemv_supported

    flat = _as_2d(spec, x, w, k_minor=True)
    if flat is None:
        return None
    x2, w2, shape = flat
    (m, k), n = x2.shape, w2.shape[0]
    if not gemv_supported(m, n, k):
        return None
    return fp8_gemv(x2, w2, scale.reshape(n)).reshape(shape)


def plain_gemv(spec: str, x, w, scale, k_minor: bool, mode: str = "all", out_dtype=None, act: str | None = None,
               partials: bool = False, out_act: str | None = None):
    """The product through ``pallas.gemv`` (w [in..., out...], or [out..., in...] with `k_minor` and
    spec rewritten for it), or None where the kernel does not serve the shape or `mode` leaves it
    to XLA: "small" a weight larger than ``SMALL_WEIGHT``, "quantized" anything but
    a K-minor one-byte weight (fp8) times one row (int8 [K, N] ran slower than XLA: 6.69 vs 5.68
    ms). `act`: x is [..., 2, f] and the kernel multiplies act(x) (pallas.gemv's act; spec is
    written for act(x)'s shape). `partials`: a split-K product at one row comes back as
    ``Partials`` (pallas.gemv partials). `out_act` "silu_mul": the result's last two dims are
    [2, f] (gate, up) and the kernel returns silu(gate) * up [..., f] instead, as ``Activated``
    (pallas.gemv out_act), where it serves the call (fp8 weights times one row); else None as for
    any call it does not serve. On a CPU backend the kernel runs in Pallas interpret mode (tests)."""
    from ..pallas.gemv import SMALL_WEIGHT, gemv, gemv_tiling

    if mode not in ("all", "small", "quantized"):
        raise ValueError(f"plain_gemv: mode {mode!r} is not 'all', 'small' or 'quantized'")
    if mode == "small" and w.size > SMALL_WEIGHT:
        return None

    flat = _as_2d(spec, x if act is None else x[..., 0, :], w, k_minor)  # (a slice for its shape only)
    if flat is None:
        return None
    x2, w2, shape = flat
    if act is not None:  # [m, 2k]: gate, then up
        x2 = x.reshape(x2.shape[0], 2 * x2.shape[1])
    if mode == "quantized" and (w2.dtype.itemsize != 1 or not k_minor or x2.shape[0] != 1):
        return None
    n = w2.shape[0] if k_minor else w2.shape[1]
    if out_act is not None and not (act is None and k_minor and w2.dtype.itemsize == 1 and x2.shape[0] == 1
                                    and shape[-2:-1] == (2,) and env_flag("JAXLLM_GEMV_OUT_ACT", "1")):
        return None  # JAXLLM_GEMV_OUT_ACT=0 (an A/B): the product alone, the activation in the down projection
    tiling = gemv_tiling(x2.shape[0], w2.shape[1] if k_minor else w2.shape[0], n, w2.dtype.itemsize, k_minor, act,
                         out_act)
    if tiling is None or (out_act is not None and (tiling["splits"] != 1 or (n // 2) % tiling["block_n"])):
        return None  # (the activation takes one split and whole column blocks of each half)
    s = None if scale is None else scale.reshape(n)
    y = gemv(x2, w2, s, k_minor=k_minor, out_dtype=out_dtype, act=act, out_act=out_act, partials=partials,
             interpret=jax.default_backend() == "cpu", **tiling)
    if out_act is not None:
        return Activated(y.reshape(shape[:-2] + shape[-1:]))
    if y.ndim == 3:  # the partials [S, 1, n]
        finish = PendingGemv(x2, w2, s, (k_minor, act, tuple(sorted(tiling.items())))) if x2.shape[0] == 1 else None
        return Partials(y.reshape(y.shape[:1] + shape), finish)
    return y.reshape(shape)


def quantize_weight(w, quantization: str, axes, out_axes):
    """(quantized weight, float32 scale per output channel) of a full-precision weight, in w's layout.

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
