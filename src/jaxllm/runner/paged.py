"""The paged KV pool and the attention that reads it, behind the ``attend`` interface models call.

KV lives in fixed-size blocks: per layer one K pool and one V pool of shape
``[(num_blocks + 1) * block_size, kv_heads, head_dim]`` (blocks flattened into slots; the last
block is padding's, see ``init_pool``). A sequence owns a
row of block ids (its block table); the token at position p lives in slot
``table[p // block_size] * block_size + p % block_size``. The host's block manager decides which
blocks a sequence owns; the device only ever sees tables and slot numbers.

``make_attend(positions, slots, block_tables)`` returns the function a model calls as
``attend(layer, q, k, v, cache) -> (out, cache)``: it writes the new K/V into their slots (slot
``-1``: padding, written to the pool's padding page or dropped) and attends each query at position p over positions
0..p of its sequence, gathered through the table. One path serves prefill, chunked prefill,
prefix-cached prefill and decode. The attention here is the pure-jnp reference (scores in
float32), the CPU path and the oracle for the Pallas kernels that plug in behind the same interface.

FP8 pools (``KvCacheConfig(dtype="fp8")``) hold float8_e4m3fn and one scale per layer for K and
one for V (static floats the runner owns: 1.0 unless a checkpoint calibrated them, as in vLLM):
writes store ``clip(k / k_scale, -448, 448)`` in fp8, and every read (the reference attention,
whole-prompt prefill, the Pallas decode kernel) multiplies the scale back in, folded into the
softmax scale for K and into the output for V, so no dequantized copy of the pool is ever made.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from ..kv_cache_config import FP8_MAX
from ..models import ModelConfig
from ..pallas.decode_attention import FP8, KV_DTYPES
from ..sharding import named_sharding, tensor_parallel_size
from ..switches import env_flag


def pool_kv_heads(cfg: ModelConfig, tp: int = 1) -> int:
    """KV heads a pool holds at tensor-parallel size tp.

    The model's KV heads, unless fewer KV heads than devices would leave them replicated while the
    query heads split (Llama-70B-like 8 KV heads at tp=16, or 4 at tp=8): then each KV head is
    stored once per device that needs it (tp heads, head j = KV head j // (tp / kv)), the layout of
    vLLM and TensorRT-LLM. Every device then holds exactly the one KV head its query heads read —
    1/kv of a replicated pool — and the Pallas kernels run per device as usual.
    """
    kv = cfg.num_kv_heads
    if kv < tp and tp % kv == 0 and cfg.num_heads % tp == 0:
        return tp
    return kv


def init_pool(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, tp: int = 1):
    """One (K, V) pool pair per layer, each [(num_blocks + 1) * block_size, pool_kv_heads, head_dim].

    The last block is the padding page: no block table holds it. A single-row write (batch-1 decode,
    ``make_attend(padding_page=True)``) sends a padding row there, so it is always in bounds and a
    plain dynamic-update-slice, which XLA fuses with the computation of the row; a dropped
    out-of-bounds write instead reads the old row back and selects (two more kernels per layer on
    the GPU). Several-row writes still drop their padding (``write_slots``)."""
    shape = ((num_blocks + 1) * block_size, pool_kv_heads(cfg, tp), cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


POOL_AXES = ("kv_slots", "kv_heads", "head_dim")


def pool_sharding(cfg: ModelConfig, mesh):
    """Pools split over KV heads across "model" (replicated where the heads do not divide)."""
    return named_sharding(POOL_AXES, mesh, (1, pool_kv_heads(cfg, tensor_parallel_size(mesh)), cfg.head_dim))


def pool_bytes_per_token(cfg: ModelConfig, dtype, tp: int = 1) -> int:
    """Bytes of K and V per token over all layers, as the pools at tensor-parallel size tp hold them."""
    return 2 * cfg.num_layers * pool_kv_heads(cfg, tp) * cfg.head_dim * jnp.dtype(dtype).itemsize


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == FP8


def to_pool(x, dtype, scale=1.0):
    """Values as a pool stores them: fp8 pools hold clip(x / scale) (saturating at +-448, where a
    plain cast would give NaN); the others a plain cast."""
    if not is_fp8(dtype):
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    if scale != 1.0:
        x = x / scale
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(dtype)


def slots_for(positions, block_tables, block_size: int, valid):
    """Slot of each position [B, T] through block_tables [B, W]; -1 where not valid."""
    blk = jnp.take_along_axis(block_tables, jnp.clip(positions // block_size, 0, block_tables.shape[1] - 1), axis=1)
    return jnp.where(valid, blk * block_size + positions % block_size, -1)


def reference_paged_attention(q, k_pool, v_pool, q_positions, block_tables, block_size: int, sliding_window,
                              k_scale=1.0, v_scale=1.0):
    """q [B, T, H, D] at q_positions [B, T]; K/V gathered through block_tables [B, W]; causal by position.

    fp8 pools are read in q's dtype (exact) with k_scale / v_scale applied in float32."""
    b, t, h, d = q.shape
    kvh = k_pool.shape[1]
    w = block_tables.shape[1]
    slot_idx = (block_tables[:, :, None] * block_size + jnp.arange(block_size)).reshape(b, w * block_size)
    k = k_pool[slot_idx]  # [B, S, Hkv, D], S = W * block_size; position j sits at index j
    v = v_pool[slot_idx]
    if is_fp8(k.dtype):
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (k_scale / d**0.5)
    kv_pos = jnp.arange(w * block_size)
    mask = kv_pos[None, None, :] <= q_positions[:, :, None]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if v_scale != 1.0:
        out = out * v_scale
    return out.reshape(b, t, h, d)


ATTENTION_BACKENDS = ("auto", "pallas", "reference")


def pallas_decode_supported(cfg: ModelConfig, kv_dtype, mesh, block_size: int) -> str | None:
    """None when the Pallas decode kernel serves this model, else the reason it does not."""
    if mesh.devices.flat[0].platform != "gpu":
        return "the Pallas kernels run on NVIDIA GPUs"
    if jnp.dtype(kv_dtype) not in KV_DTYPES:
        return f"the KV cache dtype is {jnp.dtype(kv_dtype).name} (bfloat16, float16 or fp8 needed)"
    if cfg.head_dim % 64:
        return f"head_dim {cfg.head_dim} is not a multiple of 64"
    if block_size % 8:
        return f"tokens_per_block {block_size} is not a multiple of 8"
    tp = tensor_parallel_size(mesh)
    if pool_kv_heads(cfg, tp) % tp:
        return f"{cfg.num_kv_heads} KV heads are replicated over tensor_parallel_size {tp}"
    return None


def attention_heads_per_program(batch: int, kv_heads: int) -> int:
    """The decode kernel's KV heads per program for a call of `batch` rows over `kv_heads` (one
    device's): JAXLLM_ATTN_HEADS_PER_PROGRAM = 1 (the default: one program per KV head, sequence
    and split), N (forced; capped at kv_heads, and must divide them), or auto
    (pallas.decode_attention.choose_heads_per_program: several heads where the batch alone fills the
    GPU). Measured on an H100 (BENCHMARKS.md "Thirteenth session"): at 1024 x 160 tokens the fp8
    kernel took 270 / 269 / 272 / 256 us at 1 / 2 / 4 / 8 heads a program, and 1000 x 128/128 ran 2%
    slower at 2, so 1 stays the default."""
    from ..pallas.decode_attention import choose_heads_per_program

    value = os.environ.get("JAXLLM_ATTN_HEADS_PER_PROGRAM", "1")
    if value == "auto":
        return choose_heads_per_program(batch, kv_heads)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"JAXLLM_ATTN_HEADS_PER_PROGRAM={value!r}: expected auto or a positive integer")
    n = min(int(value), kv_heads)
    if kv_heads % n:
        raise ValueError(f"JAXLLM_ATTN_HEADS_PER_PROGRAM={value!r} does not divide the {kv_heads} KV heads of a device")
    return n


def attention_lean_smem(fp8_pool: bool = True) -> bool:
    """JAXLLM_ATTN_LEAN_SMEM = 1 / 0: the decode kernel's ``lean_smem`` layout (one fp8 staging tile,
    scoped loop and epilogue buffers: three programs an SM where two fit). By default on over fp8
    pools, together with ``k_in_registers`` (attention_k_in_registers): measured on an H200
    (BENCHMARKS.md, twenty-second session) the pair takes the fp8 kernel at 1024 x 160 tokens from 193
    to 166 us (H100, twenty-first session: 196 -> 166), and 1000 x 128/128 ran 27,568 / 27,345 vs
    26,947 / 26,537 output tok/s interleaved in one call. Off by default over bf16 pools (where it
    only scopes buffers: 289.5 vs 288.9 us on an H100, thirteenth session)."""
    return env_flag("JAXLLM_ATTN_LEAN_SMEM", default="1" if fp8_pool else "0")


def attention_swap_ab() -> bool:
    """JAXLLM_ATTN_SWAP_AB = 1 (the default) / 0: the decode kernel's ``swap_ab`` form (the query rows
    on the wgmma's N: an eighth of the tensor-core work at G = 4). Measured on an H100 (BENCHMARKS.md
    "Fourteenth session"): the fp8 kernel at 1024 x 160 tokens 194 vs 272 us, and 1000 x 128/128
    25,502 vs 23,739 output tok/s in the same run."""
    return env_flag("JAXLLM_ATTN_SWAP_AB", default="1")


def attention_k_in_registers() -> bool:
    """JAXLLM_ATTN_K_REGS = 1 (the default) / 0: with swap_ab over an fp8 pool, the decode kernel
    converts each K tile in registers and hands it to the wgmma from there (``k_in_registers``: no
    staging store, 16 KiB less shared memory a program); with lean_smem, see attention_lean_smem for
    the figures. GPU only: the CPU interpreter's wgmma takes shared-memory operands, so interpreted
    calls stage K whatever this says."""
    return env_flag("JAXLLM_ATTN_K_REGS", default="1")


def attention_heads_fastest() -> bool:
    """JAXLLM_ATTN_HEADS_FASTEST = 1 / 0 (the default): the decode kernels' grid with the KV heads as
    its fastest-varying axis (``heads_fastest``), so the programs running together read whole tokens'
    rows of a few sequences instead of one head's rows of many. Measured on an H200 at 1024 x 160 /
    256 tokens (BENCHMARKS.md, twenty-third session): bf16 pools 239.5 -> 228.6 / 321.1 -> 303.8 us,
    but the fp8 default form 155.3 -> 159.5 / 200.6 -> 192.8 (no gain over a run's contexts), so off
    by default; not yet run in the model over bf16 pools (the A/B this switch is for)."""
    return env_flag("JAXLLM_ATTN_HEADS_FASTEST", default="0")


TRITON_DECODE_ENV = "JAXLLM_ATTN_TRITON"
TRITON_TILING_ENV = "JAXLLM_ATTN_TRITON_TILING"
TRITON_MIN_PROGRAMS_PER_SM = 4


def triton_decode_wanted(batch: int, kv_heads: int, num_sms: int = 132) -> bool:
    """Whether a decode call of `batch` rows over `kv_heads` (one device's) runs
    pallas.decode_attention_triton instead of the Mosaic GPU kernel: JAXLLM_ATTN_TRITON = 1 / 0
    forces it; by default (auto) not: on an H100 at 1024 rows of 128/128 it was within the noise of
    the Mosaic kernel (BENCHMARKS.md, twenty-first session). Where it serves, its (sequence, KV
    head) programs must fill the GPU by themselves (it has no split-K): at least four an SM."""
    from ..switches import env_auto_flag

    return bool(env_auto_flag(TRITON_DECODE_ENV)) and batch * kv_heads >= TRITON_MIN_PROGRAMS_PER_SM * num_sms


def triton_decode_tiling() -> dict:
    """The Triton decode kernel's tiling: its defaults, or for A/Bs
    JAXLLM_ATTN_TRITON_TILING=block_kv/num_warps/num_stages (read when a model traces)."""
    from ..switches import env_tiling

    return env_tiling(TRITON_TILING_ENV, ("block_kv", "num_warps", "num_stages")) or {}


def decode_kernel_for(block_size: int, sliding_window, mesh, interpret=False):
    """The Pallas decode kernel as attend's decode path, run per device over its KV heads.

    Called as ``kernel(q, k_pool, v_pool, tables, lengths, k_scale, v_scale)`` (the scales: floats).
    `interpret` (a ``plgpu.InterpretGPUParams``) runs it in the Mosaic GPU interpreter (CPU tests).
    """
    from jax.sharding import PartitionSpec as P

    from ..pallas.decode_attention import paged_decode_attention

    @functools.partial(jax.jit, static_argnames=("k_scale", "v_scale"))  # lowered once: see _per_device
    def run(q, k_pool, v_pool, tables, lengths, k_scale=1.0, v_scale=1.0):
        kv_heads = k_pool.shape[1]
        if triton_decode_wanted(q.shape[0], kv_heads):
            from ..pallas.decode_attention_triton import paged_decode_attention_triton

            return paged_decode_attention_triton(
                q, k_pool, v_pool, tables, lengths, block_size, sliding_window=sliding_window, k_scale=k_scale,
                v_scale=v_scale, interpret=bool(interpret), heads_fastest=attention_heads_fastest(),
                **triton_decode_tiling())
        swap, fp8 = attention_swap_ab(), k_pool.dtype == FP8
        return paged_decode_attention(
            q, k_pool, v_pool, tables, lengths, block_size, sliding_window=sliding_window, k_scale=k_scale,
            v_scale=v_scale, heads_per_program=attention_heads_per_program(q.shape[0], kv_heads),
            lean_smem=attention_lean_smem(fp8), swap_ab=swap, interpret=interpret,
            k_in_registers=swap and fp8 and not interpret and attention_k_in_registers(),
            heads_fastest=attention_heads_fastest(),
        )

    heads = P(None, "model", None)
    return _per_device(run, mesh, (heads, heads, heads, P(), P()), heads)


def fused_rope_kv_wanted(mesh) -> bool:
    """Whether decode calls finish the fused q/k/v projection, apply RoPE and write k / v into the
    pools in one kernel (pallas.rope_kv; ``PagedAttend.rope_attend``). JAXLLM_FUSED_ROPE_KV=1 / 0
    forces it; by default ("auto") on one NVIDIA GPU with JAX's Pallas Triton backend. Several
    devices keep XLA's fusions (the kernel is not written per shard)."""
    from ..pallas.gemv import triton_available
    from ..switches import env_auto_flag

    forced = env_auto_flag("JAXLLM_FUSED_ROPE_KV")
    if forced is not None:
        return forced and mesh.devices.size == 1
    return mesh.devices.size == 1 and mesh.devices.flat[0].platform == "gpu" and triton_available()


ROPE_KV_TILING_ENV = "JAXLLM_ROPE_KV_TILING"


def _rope_kv_tiling(k: int) -> dict:
    """gemv_rope_kv_write's tiling for a K-wide row: its defaults (2 RoPE pairs x 2048 bytes a step,
    one warp: 12.3 -> 11.3 us at 8B's q/k/v on an H100, fp8 batch 1 3.43 -> 3.38 ms, BENCHMARKS.md
    "Eighteenth session"), block_k at most K's largest power-of-two factor; or, for A/Bs,
    JAXLLM_ROPE_KV_TILING=block_n/block_k/num_warps (read when a model traces)."""
    from ..switches import env_tiling

    return env_tiling(ROPE_KV_TILING_ENV, ("block_n", "block_k", "num_warps")) or dict(block_k=min(k & -k, 2048))


def gemv_rope_kv_serves(pending, heads: tuple) -> bool:
    """Whether pallas.rope_kv.gemv_rope_kv_write runs a one-row q/k/v projection still to run
    (``quant.PendingGemv``, the `finish` of its Partials) with heads (KVH, G + 2, D): an fp8 weight
    stored [N, K], no activation, K a multiple of 32, D / 2 even. JAXLLM_GEMV_ROPE_KV=0 turns it off
    (an A/B: rope_kv_write after the gemv's partials instead)."""
    from ..switches import env_flag

    if pending is None or not env_flag("JAXLLM_GEMV_ROPE_KV", "1"):
        return False
    k_minor, act, _ = pending.static
    kvh, gp2, d = heads
    x, w = pending.x, pending.w
    return (k_minor and act is None and w.dtype.itemsize == 1 and x.shape[0] == 1 and x.shape[1] % 32 == 0
            and w.shape == (kvh * gp2 * d, x.shape[1]) and d % 4 == 0)


def rope_kv_kernel_for(interpret: bool = False):
    """pallas.rope_kv_write as attend's decode epilogue (``PagedAttend.rope_kv``); `interpret`:
    Pallas interpret mode (CPU tests)."""
    from ..pallas.rope_kv import rope_kv_write

    return functools.partial(rope_kv_write, interpret=interpret)


def prefill_kernel_for(block_size: int, sliding_window, mesh, interpret=False):
    """The Pallas ragged prefill kernel as attend's path for chunked / prefix-cached prefill, run per
    device over its KV heads.

    Called as ``kernel(q, k_pool, v_pool, tables, q_start, q_lens, k_scale, v_scale)``: q [B, T, H, D]
    with row b's q_lens[b] queries at positions q_start[b] + j (the engine's prefill rows).
    """
    from jax.sharding import PartitionSpec as P

    from ..pallas.prefill_attention import paged_prefill_attention

    @functools.partial(jax.jit, static_argnames=("k_scale", "v_scale"))  # lowered once: see _per_device
    def run(q, k_pool, v_pool, tables, q_start, q_lens, k_scale=1.0, v_scale=1.0):
        return paged_prefill_attention(
            q, k_pool, v_pool, tables, q_start, q_lens, block_size, sliding_window=sliding_window, k_scale=k_scale,
            v_scale=v_scale, interpret=interpret,
        )

    heads, q_heads = P(None, "model", None), P(None, None, "model", None)
    return _per_device(run, mesh, (q_heads, heads, heads, P(), P(), P()), q_heads)


def _per_device(run, mesh, in_specs, out_specs):
    """`run(*arrays, k_scale, v_scale)` on each device's KV heads (shard_map over "model"); the
    scales, static floats, are bound before the map. One device: `run` itself.

    `run` is a jitted function, so that every layer's call of it in one step program shares one
    lowering (one private function, one Mosaic GPU module): lowered inline, each of the 32 layers
    of an 8B model lowered and compiled its own copy of the kernel (~0.55 s of Python and ~0.5 s
    of compilation each, 42 s per decode program instead of 7 s on the H200)."""
    if tensor_parallel_size(mesh) == 1:
        return run

    def sharded(*args):
        arrays, scales = args[: len(in_specs)], args[len(in_specs):]
        per_device = functools.partial(run, **dict(zip(("k_scale", "v_scale"), scales)))
        return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*arrays)

    return sharded


def make_attend(positions, slots, block_tables, block_size: int, sliding_window: int | None = None,
                decode_kernel=None, fresh_impl: str | None = None, kv_scales=None,
                prefill_kernel=None, padding_page: bool = False, tensor_parallel=None,
                rope_kv=None) -> "PagedAttend":
    """The attend function a model calls, ``attend(layer, q, k, v, cache) -> (out, cache)``.

    `decode_kernel` (from `decode_kernel_for`), when given, serves one-token-per-row calls.

    `prefill_kernel` (from `prefill_kernel_for`), when given, serves multi-token calls that are not
    fresh (chunked prefill, prompts past a cached prefix): each row's queries run on contiguously
    from ``positions[:, 0]``, its valid ones first (the engine's layout).

    `kv_scales`: per layer (k_scale, v_scale) floats of an fp8 pool, indexed by the layer number
    models pass; None: 1.0 for every layer.

    `fresh_impl` ("cudnn" or "xla"), when given, says every row of this call starts at position 0
    (whole prompts, nothing cached): attention then needs only this call's K/V, and runs as
    ``jax.nn.dot_product_attention`` with that implementation (cuDNN's fused flash attention on
    NVIDIA GPUs) instead of gathering through the block tables.

    `padding_page`: the pools end with `init_pool`'s padding page, where padding rows (slot -1) write;
    otherwise their writes are dropped.

    `tensor_parallel` (``sharding.tensor_parallel_for``): the step's own tensor-parallel
    collectives (embedding lookup, row-parallel all-reduces), which the model reads from here.

    `rope_kv` (from `rope_kv_kernel_for`), when given, lets a model hand one-token-per-row calls
    its fused q/k/v projection unroped (``PagedAttend.rope_attend``): RoPE and the KV writes then
    run in that kernel.
    """
    scales = None if kv_scales is None else tuple((float(k), float(v)) for k, v in kv_scales)
    return PagedAttend(positions, slots, block_tables, block_size, sliding_window, decode_kernel, fresh_impl,
                       scales, prefill_kernel, padding_page, tensor_parallel, rope_kv)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAttend:
    """`make_attend`'s function, as a pytree: the call's arrays are its leaves and the rest (block
    size, window, kernels, scales) its static structure, so a jitted layer can take it as an
    argument and every layer of a step program can share one trace (``models.llama``)."""

    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))
    sliding_window: int | None = dataclasses.field(metadata=dict(static=True))
    decode_kernel: object = dataclasses.field(metadata=dict(static=True))
    fresh_impl: str | None = dataclasses.field(metadata=dict(static=True))
    kv_scales: tuple | None = dataclasses.field(metadata=dict(static=True))
    prefill_kernel: object = dataclasses.field(metadata=dict(static=True))
    padding_page: bool = dataclasses.field(default=False, metadata=dict(static=True))
    tensor_parallel: object = dataclasses.field(default=None, metadata=dict(static=True))
    rope_kv: object = dataclasses.field(default=None, metadata=dict(static=True))

    def rope_kv_serves(self, positions, group: int, head_dim: int) -> bool:
        """Whether ``rope_attend`` serves this call: a rope_kv kernel, one token per row, and head
        shapes the kernel takes (G and D / 2 powers of two)."""
        from ..pallas.rope_kv import rope_kv_fits

        return (self.rope_kv is not None and positions.shape[1] == 1
                and rope_kv_fits((1, 1, 1, group + 2, head_dim), group))

    def rope_attend(self, layer, qkv, cos, sin, group: int, dtype, cache):
        """attend(layer, q, k, v, cache) for a fused q/k/v projection not yet finished nor roped:
        qkv [B, 1, KVH, G + 2, D] as an array, ``Partials`` (split-K sums still to add) or ``Scaled``
        (an FP8 x FP8 product still to scale); the rows' RoPE (the model's cos / sin [B, 1, D / 2])
        and their k / v writes run in the rope_kv kernel, then attention as ``__call__``'s. One row
        whose Partials carry the fp8 product still to run (``quant.PendingGemv``): the projection,
        its RoPE and KV writes in one kernel instead (``gemv_rope_kv_serves``)."""
        from ..models.quant import Partials, Scaled
        from ..pallas.rope_kv import reference_rope_kv_write, rope_kv_fits

        row_scale = col_scale = None
        if isinstance(qkv, Partials):
            parts = qkv.parts
        elif isinstance(qkv, Scaled):
            parts, row_scale, col_scale = qkv.raw[None], qkv.x_scale, qkv.w_scale
        else:
            parts = qkv[None]
        s, b, t, kvh, gp2, d = parts.shape
        k_pool, v_pool = cache[layer]
        k_scale, v_scale = (1.0, 1.0) if self.kv_scales is None else self.kv_scales[layer]
        pending = qkv.finish if isinstance(qkv, Partials) else None
        if b * t == 1 and gemv_rope_kv_serves(pending, (kvh, gp2, d)):
            # one row: the projection itself, its RoPE and KV writes in one kernel (pallas.rope_kv)
            from ..pallas.rope_kv import gemv_rope_kv_write

            kk = pending.x.shape[1]
            q, k_pool, v_pool = gemv_rope_kv_write(
                pending.x, pending.w, pending.scale, cos.reshape(1, -1), sin.reshape(1, -1), self.slots.reshape(1),
                k_pool, v_pool, group=group, dtype=jnp.dtype(dtype), k_scale=k_scale, v_scale=v_scale,
                interpret=jax.default_backend() == "cpu", **_rope_kv_tiling(kk))
            return self._attend_roped(layer, q.reshape(b, t, kvh * group, d), k_pool, v_pool, k_scale, v_scale, cache)
        parts = parts.reshape(s, b * t, kvh, gp2, d)
        if row_scale is not None:
            row_scale = jnp.broadcast_to(row_scale, (b, t) + (1,) * (row_scale.ndim - 2)).reshape(b * t)
        if col_scale is not None:
            col_scale = jnp.broadcast_to(col_scale, (kvh, gp2, d))
        # a split count the kernel does not take (a gemv tiling forced by JAXLLM_GEMV_TILING): the same in jnp
        write = self.rope_kv if rope_kv_fits(parts.shape, group) else reference_rope_kv_write
        q, k_pool, v_pool = write(parts, cos.reshape(b * t, -1), sin.reshape(b * t, -1), self.slots.reshape(b * t),
                                  k_pool, v_pool,
                                  row_scale, col_scale, group=group, dtype=jnp.dtype(dtype), k_scale=k_scale,
                                  v_scale=v_scale)
        return self._attend_roped(layer, q.reshape(b, t, kvh * group, d), k_pool, v_pool, k_scale, v_scale, cache)

    def _attend_roped(self, layer, q, k_pool, v_pool, k_scale: float, v_scale: float, cache):
        """rope_attend's end: attention of the roped q over the pools holding this call's k / v."""
        out = self._paged_read(q, k_pool, v_pool, k_scale, v_scale)
        cache = list(cache)
        cache[layer] = (k_pool, v_pool)
        return out, cache

    def for_layer(self, layer: int) -> "PagedAttend":
        """The attend of one layer's call with a one-layer cache (its scales at index 0)."""
        scales = None if self.kv_scales is None else (self.kv_scales[layer],)
        return dataclasses.replace(self, kv_scales=scales)

    def __call__(self, layer, q, k, v, cache):
        positions, slots, block_tables, block_size = self.positions, self.slots, self.block_tables, self.block_size
        sliding_window = self.sliding_window
        use_fresh = self.fresh_impl is not None and positions.shape[1] > 1
        use_prefill = self.prefill_kernel is not None and positions.shape[1] > 1 and not use_fresh
        k_pool, v_pool = cache[layer]
        k_scale, v_scale = (1.0, 1.0) if self.kv_scales is None else self.kv_scales[layer]
        if k_pool.shape[1] != k.shape[2]:  # one copy of each KV head per device that reads it
            k, v = (jnp.repeat(x, k_pool.shape[1] // x.shape[2], axis=2) for x in (k, v))
        k_new = to_pool(k, k_pool.dtype, k_scale)
        v_new = to_pool(v, v_pool.dtype, v_scale)
        k_pool, v_pool = (write_slots(pool, slots, x, self.padding_page) for pool, x in ((k_pool, k_new), (v_pool, v_new)))
        if use_fresh:
            lens = jnp.sum(slots >= 0, axis=1).astype(jnp.int32)
            window = (sliding_window - 1, 0) if sliding_window is not None else None
            fp8 = is_fp8(k_pool.dtype)  # attend to what the pool holds, as every later read does
            out = jax.nn.dot_product_attention(
                q, (k_new if fp8 else k).astype(q.dtype), (v_new if fp8 else v).astype(q.dtype), is_causal=True,
                query_seq_lengths=lens, key_value_seq_lengths=lens, local_window_size=window,
                scale=k_scale / q.shape[-1] ** 0.5, implementation=self.fresh_impl,
            ).astype(jnp.float32)
            if v_scale != 1.0:
                out = out * v_scale
        elif use_prefill:
            q_lens = jnp.sum(slots >= 0, axis=1).astype(jnp.int32)
            out = self.prefill_kernel(q, k_pool, v_pool, block_tables, positions[:, 0], q_lens, k_scale, v_scale)
        else:
            out = self._paged_read(q, k_pool, v_pool, k_scale, v_scale)
        cache = list(cache)
        cache[layer] = (k_pool, v_pool)
        return out, cache

    def _paged_read(self, q, k_pool, v_pool, k_scale: float, v_scale: float):
        """Attention of q [B, T, H, D] over the pools (this call's writes in them): the decode
        kernel for one-token rows where there is one, else the jnp reference."""
        if self.decode_kernel is not None and q.shape[1] == 1:
            return self.decode_kernel(q[:, 0], k_pool, v_pool, self.block_tables, self.positions[:, 0] + 1, k_scale,
                                      v_scale)[:, None]
        return reference_paged_attention(q, k_pool, v_pool, self.positions, self.block_tables, self.block_size,
                                         self.sliding_window, k_scale, v_scale)


def write_slots(pool, slots, rows, padding_page: bool):
    """``pool`` [S, KVH, D] with ``rows`` [B, T, KVH, D] stored at ``slots`` [B, T]. Padding (slot -1)
    is dropped; a single row (batch-1 decode) is a dynamic-update-slice, its padding written to the
    pool's last slot when the pool ends with a padding page.

    Several rows stay a scatter that drops padding: sending all of a padded prefill's padding to one
    slot instead made thousands of colliding writes (1000 x 128/128 on an H100 fell from 9,400 to
    1,500 tok/s, all of it in the prefill). Each padding row goes to its own index past the pool, so
    every index is distinct and the scatter says so (``unique_indices``): XLA then stores the rows as
    they are, where a scatter that may collide updates 8- and 16-bit elements (fp8 / bf16 pools) with
    compare-and-swap loops on their 32-bit words."""
    n = pool.shape[0]
    flat = slots.reshape(-1)
    rows = rows.reshape(-1, *pool.shape[1:])
    if padding_page and flat.shape[0] == 1:  # XLA fuses the row's computation into the in-place update
        idx = jnp.where((flat[0] < 0) | (flat[0] >= n), n - 1, flat[0])
        return jax.lax.dynamic_update_slice(pool, rows, (idx, 0, 0))
    past = n + jnp.arange(flat.shape[0], dtype=flat.dtype)  # padding -> past the pool, each its own -> dropped
    return pool.at[jnp.where(flat < 0, past, flat)].set(rows, mode="drop", unique_indices=True)


def device_memory(mesh) -> dict | None:
    """The first device's allocator figures (bytes): limit, in use, peak in use; None on CPUs."""
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats:
        return None
    return {k: stats[k] for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use") if k in stats}


def plan_num_blocks(cfg: ModelConfig, dtype, block_size: int, kv_config, mesh) -> int:
    """How many KV blocks to allocate (see KvCacheConfig).

    On an accelerator: free_gpu_memory_fraction of the memory still free after the weights on each
    device (capped by max_tokens). On CPU: max_tokens, default CPU_DEFAULT_MAX_TOKENS within
    CPU_DEFAULT_MAX_BYTES.
    """
    from ..kv_cache_config import CPU_DEFAULT_MAX_BYTES, CPU_DEFAULT_MAX_TOKENS

    shards = 1
    for axis in pool_sharding(cfg, mesh).spec:
        if axis is not None:
            shards *= mesh.shape[axis]
    per_token = pool_bytes_per_token(cfg, dtype, tensor_parallel_size(mesh)) // shards  # on each device
    stats = device_memory(mesh)
    # a budget of bytes holds init_pool's padding page too; a budget of tokens counts usable ones
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        blocks = int(free * kv_config.free_gpu_memory_fraction) // per_token // block_size - 1
        if kv_config.max_tokens is not None:
            blocks = min(blocks, kv_config.max_tokens // block_size)
    elif kv_config.max_tokens is not None:
        blocks = kv_config.max_tokens // block_size
    else:
        blocks = min(CPU_DEFAULT_MAX_TOKENS // block_size, CPU_DEFAULT_MAX_BYTES // per_token // block_size - 1)
    return max(1, blocks)
