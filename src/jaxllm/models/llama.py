"""The Llama family as Flax NNX modules: Llama 2/3/3.1/3.2, TinyLlama, Mistral, Qwen2, Qwen3.

These architectures differ only in small switches read from the config: q/k/v biases (Qwen2),
RMSNorm on q and k per head (Qwen3), tied embeddings (Llama 3.2), the rope frequency schedule
(Llama 3.1's "llama3" scaling) and a sliding attention window (Mistral v0.1). One file holds them.

Weights are stored in the layout the matmuls want, with a logical axis name per dimension
(``axes`` metadata) that ``jaxllm.sharding`` maps to mesh axes: a projection into heads is
``[embed, heads, head_dim]``, out of heads ``[heads, head_dim, embed]``. k and v are one
projection (``kv``, ``[embed, kv_heads, 2, head_dim]``), and so are gate and up (``gate_up``,
``[embed, 2, mlp]``): one matmul each instead of two -- measured on an H100 at 8B shapes, fewer,
larger decode GEMVs made a step 7-17% faster. Their "stack" axis is never sharded, so every tensor-
parallel shard holds its own k and v heads (gate and up columns) side by side; the loader stacks
the two HF tensors (``Rule.part``). The attention projections run as 2-D matmuls over their
flattened head dims (``_flat_einsum``): the sharded axis (heads, kv_heads) is the major one of each
flattened group, so a shard's slice stays contiguous. A batch-1 k/v matmul alone (4096 x 2048 at
8B shapes, under the 10M elements of XLA:GPU's DotStrengthReduction) runs as multiply + reduce,
with its weight transposed on every call (JAX 0.11.2; H100 profile, BENCHMARKS.md). So, where the
KV heads split evenly over the tensor-parallel devices, the loader can fuse q into it
(``fuse_qkv``: ``qkv``, ``[embed, kv_heads, G + 2, head_dim]``, each KV head's G query heads then
its k and v), one 4096 x 6144 GEMM at 8B shapes -- by default on several GPUs, and on one for fp8
weights (``loader.fused_qkv_wanted``, ``JAXLLM_FUSED_QKV``): on one H100 in bf16 it gained 0.03 ms
per token at batch 1 and lost ~8% of throughput at 256 rows; at tp=2 it makes each shard's q and
k/v one pallas.gemv (batch 1 4.26 -> 4.06 ms on 2x H200); fp8 batch 1 on one H100 ~0.1 ms faster,
and fp8-w8a8's FP8 dots no longer concatenate the three weights on every call. Checkpoints keep q
and kv apart (``unfused_qkv_dict``), so any tensor-parallel size loads them. With ``cfg.quantization`` ("fp8" /
"int8") the projections hold 8-bit weights and a ``<name>_scale`` per output channel
(``models/quant.py``); the embedding, lm_head and norms stay in ``dtype``.

Attention itself (writing K/V into the cache and reading it back) is not done here: the caller
passes an ``attend(layer, q, k, v, cache) -> (out, cache)`` function, so the cache layout (contiguous
now, paged later) and the kernel (jnp reference or Pallas) can change without touching the model. An
attend that offers ``rope_attend`` (the runner's on one GPU, for decode calls) takes a fused q/k/v
projection unfinished and unroped instead: its epilogue, RoPE and the KV writes are one kernel there.
Under tensor parallelism the runner's attend also carries a ``sharding.TensorParallel``: the
embedding lookup and the projections go through it (``_parallel``), which decides what runs per
device in ``shard_map`` and what XLA's partitioner keeps.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..switches import env_flag
from .config import ModelConfig, RopeConfig
from .quant import Activated, Partials, is_k_minor, k_minor_order, plain_gemv, qeinsum, scale_param, weight_dtype

Attend = Callable  # (layer: int, q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache) -> (out [B,T,H,D], cache)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes), init=init)


def _projection(rngs: nnx.Rngs, shape, axes, out_axes, dtype, quantization: str | None):
    """A projection's weight and, when quantized (see ``models/quant.py``), its scale (else None).

    shape / axes are the plain layout's ([in..., out...]); an fp8 weight is stored K-minor
    ([out..., in...]; the loader places it so by its quantization)."""
    scale = scale_param(shape, axes, out_axes) if quantization else None
    if is_k_minor(quantization):
        order = k_minor_order(axes, out_axes)
        shape, axes = tuple(shape[i] for i in order), tuple(axes[i] for i in order)
    return _param(rngs, shape, axes, weight_dtype(quantization, dtype)), scale


def _value(p):
    return None if p is None else p[...]


def _axes(p: nnx.Param) -> tuple:
    return tuple(p.get_metadata()["axes"])


def _parallel(kind: str, attend, f, x, x_axes, w: nnx.Param, scale: nnx.Param | None, keep_float32: bool = False):
    """f(x, w, scale) of a projection, through the step's ``sharding.TensorParallel`` when `attend`
    carries one (the runner's does under tensor parallelism), else as it is (XLA's partitioner).
    kind: "row" (the contracting dim is split: o, down -- partial sums to add; f takes an
    `out_dtype` for them) or "column" (the output dim is split: q, k/v, gate/up). `keep_float32`
    (row): the summed partials may come back in float32, for add_norm's kernel to round."""
    tp = getattr(attend, "tensor_parallel", None)
    if tp is None:
        return f(x, w[...], _value(scale))
    if kind == "row":
        return tp.row_parallel(f, x, x_axes, w[...], _axes(w), _value(scale), keep_float32=keep_float32)
    return tp.column_parallel(f, x, x_axes, w[...], _axes(w), _value(scale))


QKV_AXES = ("embed", "kv_heads", "stack", "head_dim")  # the fused k/v (and q/k/v) projection's axes
# the parameters a fused q/k/v is made of: fused name -> (q part, k/v part)
_QKV_PARTS = {"qkv": ("q", "kv"), "qkv_scale": ("q_scale", "kv_scale"), "qkv_bias": ("q_bias", "kv_bias")}


def can_fuse_qkv(cfg: ModelConfig, tp: int) -> bool:
    """Whether q/k/v can be one parameter on tp devices: the KV heads must split evenly, so that
    each shard holds its KV heads' query heads, k and v side by side."""
    return cfg.num_kv_heads % tp == 0 and cfg.num_heads % cfg.num_kv_heads == 0


def _split_heads(axes: tuple, shape: tuple, kv_heads: int) -> tuple[tuple, tuple]:
    """A q part's axes and shape with its "heads" axis split into ("kv_heads", "stack")."""
    i = axes.index("heads")
    return (axes[:i] + ("kv_heads", "stack") + axes[i + 1 :],
            shape[:i] + (kv_heads, shape[i] // kv_heads) + shape[i + 1 :])


def fuse_qkv(state: nnx.State, fused_abstract: nnx.State, cfg: ModelConfig, mesh) -> nnx.State:
    """The parameters of the fused model (``fused_abstract``, cfg.fused_qkv) from those of the
    unfused one: per layer q / kv (and their scales and biases) become one qkv, q's heads grouped
    under their KV head ahead of k and v along the "stack" axis. Each fused array is made on the
    devices (one small jitted concatenation per shape) with its own sharding; nothing moves between
    devices (the KV heads are sharded, the stack axis never). Works on any layout the weights are
    stored in (fp8's K-minor ones included): the axes metadata says where heads and stack are."""
    from ..sharding import named_sharding

    flat = dict(nnx.to_flat_state(state))
    out = []
    for path, var in nnx.to_flat_state(fused_abstract):
        name = path[-1]
        if name not in _QKV_PARTS:
            out.append((path, flat[path]))
            continue
        qv, kvv = (flat[path[:-1] + (part,)] for part in _QKV_PARTS[name])
        q_axes, q_shape = _split_heads(tuple(qv.get_metadata()["axes"]), tuple(qv.get_value().shape), cfg.num_kv_heads)
        axes = tuple(var.get_metadata()["axes"])
        if q_axes != axes or tuple(kvv.get_metadata()["axes"]) != axes:
            raise ValueError(f"cannot fuse {path}: q axes {q_axes}, kv axes {kvv.get_metadata()['axes']}, fused {axes}")
        target = var.get_value()
        sharding = named_sharding(axes, mesh, tuple(target.shape))
        var.set_value(_concat_stack(q_shape, axes.index("stack"), sharding)(qv.get_value(), kvv.get_value()))
        for part in (qv, kvv):  # freed as we go: at most one layer's q/k/v is held twice
            part.get_value().delete()
        out.append((path, var))
    return nnx.from_flat_state(out)


@functools.lru_cache(maxsize=None)
def _concat_stack(q_shape: tuple, axis: int, sharding):
    return jax.jit(lambda q, kv: jnp.concatenate([q.reshape(q_shape), kv], axis=axis), out_shardings=sharding)


def unfused_qkv_dict(params: nnx.State, cfg: ModelConfig) -> dict:
    """The parameters as a pure dict (nnx.to_pure_dict) with every fused qkv split back into q and
    kv (and their scales and biases), the inverse of ``fuse_qkv``, read from the same axes
    metadata: the canonical layout an Orbax checkpoint holds, restorable at any tensor-parallel size."""
    g = cfg.num_heads // cfg.num_kv_heads
    pure = nnx.to_pure_dict(params)
    for path, var in nnx.to_flat_state(params):
        if path[-1] not in _QKV_PARTS:
            continue
        node = functools.reduce(lambda d, key: d[key], path[:-1], pure)
        del node[path[-1]]
        axes, w = tuple(var.get_metadata()["axes"]), var.get_value()
        k_axis, s_axis = axes.index("kv_heads"), axes.index("stack")  # adjacent: q's heads split in two
        q_name, kv_name = _QKV_PARTS[path[-1]]
        q = jax.lax.slice_in_dim(w, 0, g, axis=s_axis)
        node[q_name] = q.reshape(q.shape[:k_axis] + (q.shape[k_axis] * g,) + q.shape[s_axis + 1 :])
        node[kv_name] = jax.lax.slice_in_dim(w, g, g + 2, axis=s_axis)
    return pure


def _gemv_kernel(cfg: ModelConfig) -> bool | str:
    """The decode GEMV kernel of a model's projections (qeinsum's `gemv`): True for the Mosaic fp8
    kernel (JAXLLM_FP8_GEMV=1), else the pallas.gemv mode ("all", "small", "quantized"), or False."""
    return cfg.fp8_gemv or cfg.triton_gemv or False


def _flat_einsum(spec: str, x, w, scale=None, w8a8: bool = False, gemv: bool | str = False, out_dtype=None,
                 partials: bool = False, raw: bool = False):
    """qeinsum(spec, ...) of a projection whose weight is [in..., out...] (x's trailing dims contract
    with w's leading ones) as one 2-D matmul over the flattened in and out dims, for a plain weight
    (quantized ones keep qeinsum's own paths). Each flattened group's sharded axis must be its major
    one (heads, kv_heads), which keeps a shard's slice contiguous: no resharding under SPMD.
    out_dtype: the result's (default x's; float32 for partial sums still to be added); `partials`: as
    qeinsum's (a split-K gemv's sums may come back unadded, as ``Partials``); `raw`: as qeinsum's
    (an FP8 x FP8 product may come back unscaled, as ``Scaled``)."""
    if scale is not None:
        return qeinsum(spec, x, w, scale, w8a8, gemv, out_dtype, partials=partials, raw=raw)
    if isinstance(gemv, str) and (y := plain_gemv(spec, x, w, None, False, gemv, out_dtype,
                                                  partials=partials)) is not None:
        return y
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    n_in = sum(c in xs for c in ws)  # w's leading, contracting dims
    batch = x.shape[: x.ndim - n_in]
    y = jnp.matmul(x.reshape(batch + (-1,)), w.reshape(math.prod(w.shape[:n_in]), -1), preferred_element_type=out_dtype)
    return y.reshape(batch + w.shape[n_in:])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis_name: str = "norm"):
        self.eps = eps
        self.weight = _param(rngs, (dim,), (axis_name,), dtype, init="ones")

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies for rotary embeddings, with the "linear" and "llama3" schedules."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """RoPE's cos and sin [B, T, D/2] of positions [B, T] (float32)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, positions, inv_freq):
    """Rotate x [B, T, heads, D] by positions [B, T] (the half-split layout HF checkpoints use)."""
    cos, sin = (c[:, :, None, :] for c in rope_cos_sin(positions, inv_freq))
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qz = cfg.quantization
        self.fused = cfg.fused_qkv
        self.group = h // kv  # query heads per KV head
        if self.fused:  # q, k, v as one matmul: per KV head its G query heads, then k, then v
            self.qkv, self.qkv_scale = _projection(rngs, (e, kv, self.group + 2, d), QKV_AXES,
                                                   QKV_AXES[1:], dtype, qz)
        else:
            self.q, self.q_scale = _projection(rngs, (e, h, d), ("embed", "heads", "head_dim"), ("heads", "head_dim"),
                                               dtype, qz)
            # k and v as one matmul: [embed, kv_heads, 2, head_dim] (the "stack" axis is never sharded)
            self.kv, self.kv_scale = _projection(rngs, (e, kv, 2, d), QKV_AXES, QKV_AXES[1:], dtype, qz)
        self.o, self.o_scale = _projection(rngs, (h, d, e), ("heads", "head_dim", "embed"), ("embed",), dtype, qz)
        if cfg.attention_bias and self.fused:
            self.qkv_bias = _param(rngs, (kv, self.group + 2, d), QKV_AXES[1:], dtype, init="zeros")
        elif cfg.attention_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), dtype, init="zeros")
            self.kv_bias = _param(rngs, (kv, 2, d), QKV_AXES[1:], dtype, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (e,), ("embed",), dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs, axis_name="head_dim")
        self.w8a8 = cfg.fp8_activations
        self.gemv = _gemv_kernel(cfg)
        self.has_bias = cfg.attention_bias
        self.has_o_bias = cfg.o_bias
        self.fused_norm = cfg.fused_norm  # the output may stay float32 under shard_map (add_norm rounds it)
        self.qk_norm = cfg.qk_norm
        self.rope = cfg.rope
        self.head_dim = d

    def __call__(self, layer: int, x, positions, cache, attend: Attend):
        x_axes = (None, None, "embed")
        inv_freq = rope_inv_freq(self.rope, self.head_dim)  # a numpy constant, folded at trace time
        if (self.fused and not (self.has_bias or self.qk_norm)
                and getattr(attend, "rope_kv_serves", lambda *a: False)(positions, self.group, self.head_dim)):
            # decode with attend's rope_kv kernel: the projection handed over unfinished (split-K
            # partials, an FP8 product still to scale) and unroped; its epilogue, RoPE and the KV
            # writes run in that one kernel (runner/paged.py: PagedAttend.rope_attend)
            qkv = _parallel("column", attend,
                            lambda x, w, s: _flat_einsum("bte,eksd->btksd", x, w, s, self.w8a8, self.gemv,
                                                         partials=True, raw=True),
                            x, x_axes, self.qkv, self.qkv_scale)
            cos, sin = rope_cos_sin(positions, inv_freq)
            out, cache = attend.rope_attend(layer, qkv, cos, sin, self.group, x.dtype, cache)
            return self._output(out, x, attend), cache
        if self.fused:
            qkv = _parallel("column", attend, lambda x, w, s: _flat_einsum("bte,eksd->btksd", x, w, s, self.w8a8, self.gemv),
                            x, x_axes, self.qkv, self.qkv_scale)
            if self.has_bias:
                qkv = qkv + self.qkv_bias[...]
            b, t, kvh, _, d = qkv.shape
            q = qkv[:, :, :, : self.group].reshape(b, t, kvh * self.group, d)  # query head h: KV head h // G
            k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]
        else:
            q = _parallel("column", attend, lambda x, w, s: _flat_einsum("bte,ehd->bthd", x, w, s, self.w8a8, self.gemv),
                          x, x_axes, self.q, self.q_scale)
            kv = _parallel("column", attend, lambda x, w, s: _flat_einsum("bte,eksd->btksd", x, w, s, self.w8a8, self.gemv),
                           x, x_axes, self.kv, self.kv_scale)
            if self.has_bias:
                q, kv = q + self.q_bias[...], kv + self.kv_bias[...]
            k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = attend(layer, q, k, v, cache)
        return self._output(out, x, attend), cache

    def _output(self, out, x, attend):
        """The output projection of attention's result out [B, T, H, D] (its bias added)."""
        to_norm = self.fused_norm and not self.has_o_bias  # y goes straight into the fused add + norm
        partials = _partials_wanted(to_norm, attend)
        y = _parallel("row", attend, lambda o, w, s, out_dtype=None: _flat_einsum("bthd,hde->bte", o, w, s, self.w8a8,
                                                                                self.gemv, out_dtype, partials),
                      out.astype(x.dtype), (None, None, "heads", "head_dim"), self.o, self.o_scale,
                      keep_float32=to_norm)
        if self.has_o_bias:
            y = y + self.o_bias[...]
        return y


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        qz = cfg.quantization
        # gate and up as one matmul: [embed, 2, mlp] (the "stack" axis is never sharded)
        self.gate_up, self.gate_up_scale = _projection(rngs, (e, 2, f), ("embed", "stack", "mlp"), ("stack", "mlp"), dtype, qz)
        self.down, self.down_scale = _projection(rngs, (f, e), ("mlp", "embed"), ("embed",), dtype, qz)
        self.w8a8 = cfg.fp8_activations
        self.gemv = _gemv_kernel(cfg)
        self.has_bias = cfg.mlp_bias
        self.fused_norm = cfg.fused_norm  # the output may stay float32 under shard_map (add_norm rounds it)
        self.silu_quant = cfg.fused_silu_quant and cfg.fp8_activations and not cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_up_bias = _param(rngs, (2, f), ("stack", "mlp"), dtype, init="zeros")
            self.down_bias = _param(rngs, (e,), ("embed",), dtype, init="zeros")

    def __call__(self, x, attend=None):
        """`attend`: the step's, for its tensor-parallel projections (see _parallel)."""
        # fp8-w8a8 on one device (cfg.fused_silu_quant): an FP8 x FP8 gate/up product comes back
        # unscaled (quant.Scaled) for the down projection's pallas.silu_mul_quant to scale
        raw = self.silu_quant and _one_device(attend)
        # one device, no bias: the gate/up gemv may return silu(gate) * up itself (quant.Activated)
        out_act = "silu_mul" if _one_device(attend) and not self.has_bias else None
        gu = _parallel("column", attend, lambda x, w, s: qeinsum("...e,esf->...sf", x, w, s, self.w8a8, self.gemv,
                                                                 raw=raw, out_act=out_act),
                       x, (None,) * (x.ndim - 1) + ("embed",), self.gate_up, self.gate_up_scale)
        act = "silu_mul"
        if isinstance(gu, Activated):
            gu, act = gu.value, None
        if self.has_bias:
            gu = gu + self.gate_up_bias[...]
        # silu(gate) * up, then down: in one pallas.gemv call where the down projection goes there
        # (the activation computed as the kernel reads gu), else as written in qeinsum
        to_norm = self.fused_norm and not self.has_bias  # y goes straight into the fused add + norm
        partials = _partials_wanted(to_norm, attend)
        y = _parallel("row", attend, lambda gu, w, s, out_dtype=None: qeinsum("...f,fe->...e", gu, w, s, self.w8a8,
                                                                             self.gemv, out_dtype, act=act,
                                                                             partials=partials),
                      gu, (None,) * (gu.ndim - (2 if act else 1)) + (("stack", "mlp") if act else ("mlp",)),
                      self.down, self.down_scale, keep_float32=to_norm)
        if self.has_bias:
            y = y + self.down_bias[...]
        return y


def _partials_wanted(to_add_norm: bool, attend) -> bool:
    """Whether a row-parallel projection (o, down) may hand add_norm its split-K partial sums
    (quant.Partials: the gemv's epilogue kernel is then add_norm's): when its result goes straight
    into the fused add + norm, and not under a TensorParallel (whose all-reduce adds a shard's sum)."""
    return to_add_norm and _one_device(attend)


def _one_device(attend) -> bool:
    """Whether the step's projections run as they are, not through a TensorParallel (see _parallel):
    where a projection may hand its consumer an unfinished result (quant.Partials, quant.Scaled)."""
    return getattr(attend, "tensor_parallel", None) is None


def add_norm(x, y, norm: RMSNorm, attend=None, fused: bool = False, quantize: bool = False):
    """(h, norm(h)) for h = x + y: the residual stream x after adding a block's output y, and its
    RMSNorm. With `fused` (cfg.fused_norm), decode-sized calls run both in one kernel
    (pallas.add_norm), per device under the step's TensorParallel (its shard_map modes; not under
    XLA's partitioner, which cannot split a kernel); else, and for other shapes, as written here.
    y None: nothing to add (the first layer); y float32 (a row-parallel sum kept unrounded for the
    kernel): rounded to x's dtype first, as the projection would have; y ``Partials`` (a split-K
    gemv's float32 sums, _partials_wanted): added by the kernel, else here. `quantize`
    (cfg.fused_norm_quant, fp8-w8a8): where the call multiplies FP8 x FP8 (at least
    quant.FP8_MATMUL_MIN_TOKENS tokens, one device), the norm comes back quantized per token
    (quant.Quantized) from one kernel with the add (pallas.add_norm.add_rmsnorm_quant)."""
    if quantize and (out := _add_norm_quant(x, y, norm, attend)) is not None:
        return out
    if y is None:
        return x, norm(x)
    if fused and (out := _fused_add_norm(x, y, norm, attend)) is not None:
        return out
    if isinstance(y, Partials):
        y = y.total(jnp.float32)
    h = x + y.astype(x.dtype)
    return h, norm(h)


def _add_norm_quant(x, y, norm: RMSNorm, attend):
    from ..pallas.add_norm import add_rmsnorm_quant, add_rmsnorm_quant_fits
    from .quant import FP8_MATMUL_MIN_TOKENS, Quantized

    e = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if not (_one_device(attend) and rows >= FP8_MATMUL_MIN_TOKENS and add_rmsnorm_quant_fits(e)):
        return None
    if isinstance(y, Partials):
        y = y.total(jnp.float32)
    h, q, scale = add_rmsnorm_quant(x.reshape(rows, e), None if y is None else y.reshape(rows, e), norm.weight[...],
                                    eps=norm.eps, interpret=jax.default_backend() == "cpu")
    return h.reshape(x.shape), Quantized(q.reshape(x.shape), scale.reshape(x.shape[:-1]), x.dtype)


def _fused_add_norm(x, y, norm: RMSNorm, attend):
    from ..pallas.add_norm import add_rmsnorm, add_rmsnorm_fits

    e = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    tp = getattr(attend, "tensor_parallel", None)
    if not add_rmsnorm_fits(rows, e) or (tp is not None and tp.mode == "xla"):
        return None
    if (isinstance(y, Partials) and y.finish is not None and rows == 1 and tp is None
            and env_flag("JAXLLM_GEMV_NORM_EPILOGUE")):  # the gemv finishes it (an A/B: measured no faster)
        h, n = y.finish.add_norm(x.reshape(rows, e), norm.weight[...], norm.eps)
        return h.reshape(x.shape), n.reshape(x.shape)
    f = functools.partial(add_rmsnorm, eps=norm.eps, interpret=jax.default_backend() == "cpu")
    ys = y.parts.reshape(-1, rows, e) if isinstance(y, Partials) else y.reshape(rows, e)
    args = (x.reshape(rows, e), ys, norm.weight[...])
    h, n = f(*args) if tp is None else tp.replicated(f, *args)
    return h.reshape(x.shape), n.reshape(x.shape)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = MLP(cfg, dtype, rngs)
        self.fused_norm = cfg.fused_norm
        self.norm_quant = cfg.fused_norm_quant and cfg.fp8_activations

    def __call__(self, layer: int, xy, positions, cache, attend: Attend):
        """xy: (the residual stream, the previous layer's MLP output still to be added to it -- so
        that the add and this layer's input norm can be one kernel). Returns (the residual stream,
        this layer's MLP output), cache."""
        x, n = add_norm(*xy, self.input_norm, attend, self.fused_norm, self.norm_quant)
        h, cache = self.attn(layer, n, positions, cache, attend)
        x, n = add_norm(x, h, self.post_attn_norm, attend, self.fused_norm, self.norm_quant)
        return (x, self.mlp(n, attend)), cache


def _call_layer(layer: DecoderLayer, i: int, x, positions, cache, attend: Attend):
    """layer(i, x, positions, cache, attend) (x: the layer's (residual, to add) pair), through one
    jitted function that every layer of the same structure shares when `attend` can be passed to it
    (a pytree with ``for_layer``, as the runner's is): the step program then traces and lowers two
    layers (the first, with nothing to add, and one for the rest), not each of them -- 16x less
    Python per program at 8B (its layers still compile unrolled: XLA inlines the calls)."""
    if not hasattr(attend, "for_layer"):
        return layer(i, x, positions, cache, attend)
    graphdef, state = nnx.split(layer)
    x, kv = _shared_layer(graphdef, state, x, positions, cache[i], attend.for_layer(i))
    cache = list(cache)
    cache[i] = kv
    return x, cache


@functools.partial(jax.jit, static_argnums=0)
def _shared_layer(graphdef, state, x, positions, kv, attend):
    x, cache = nnx.merge(graphdef, state)(0, x, positions, [kv], attend)
    return x, cache[0]


class LlamaForCausalLM(nnx.Module):
    """Decoder-only transformer; ``__call__`` returns final hidden states, ``logits`` projects them."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head, self.lm_head_scale = _projection(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                                           ("vocab",), dtype,
                                                           cfg.quantization if cfg.quantize_lm_head else None)

    def __call__(self, tokens, positions, cache, attend: Attend):
        """tokens, positions: [B, T] int32. Returns (hidden [B, T, E] after the final norm, cache)."""
        tp = getattr(attend, "tensor_parallel", None)  # the vocabulary-parallel lookup under tensor parallelism
        x = jnp.take(self.embed[...], tokens, axis=0) if tp is None else tp.embed(self.embed[...], _axes(self.embed), tokens)
        xy = (x, None)  # nothing to add before the first layer: traced on its own, the others share one trace
        for i, layer in enumerate(self.layers):
            xy, cache = _call_layer(layer, i, xy, positions, cache, attend)
        return add_norm(*xy, self.norm, attend, self.config.fused_norm)[1], cache

    def logits(self, hidden):
        """float32 logits [..., vocab] for hidden states [..., E]."""
        if self.config.tie_word_embeddings:
            w = self.embed[...]
            return jnp.einsum("...e,ve->...v", hidden, w, preferred_element_type=jnp.float32)
        if self.lm_head_scale is not None:  # fp8 (ModelConfig.quantize_lm_head): as the projections
            cfg = self.config
            return qeinsum("...e,ev->...v", hidden, self.lm_head[...], self.lm_head_scale[...], cfg.fp8_activations,
                           _gemv_kernel(cfg), jnp.float32)
        return jnp.einsum("...e,ev->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)
