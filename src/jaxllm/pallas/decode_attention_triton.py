"""Paged decode attention for large batches of short contexts (Pallas, Triton backend).

The same function as ``pallas.decode_attention.paged_decode_attention`` (one query token per
sequence over its KV pages; pools ``[slots, kv_heads, head_dim]``, pages of ``block_size`` slots,
``block_tables[b]`` a sequence's page ids, ``lengths[b]`` its valid tokens), written for the shape
where that Mosaic GPU kernel is slowest for its bytes: a thousand sequences of ~130-260 tokens,
a throughput run's decode step. There every (sequence, KV head) program of the Mosaic kernel runs
2-4 steps, each a serial chain on its one warpgroup (TMA wait, fp8 -> f16 staging in shared
memory, wgmma, a softmax reduced across warps, P stored for the second wgmma), and its ~70 KiB of
shared memory leaves 3 programs an SM to hide one another's waits: 183-194 us at 1024 x 160 tokens
on an H100, 1.7 TB/s of fp8 KV (BENCHMARKS.md, fourteenth session).

Here a program is one (sequence, KV head) as there, but a Triton one: its K / V tile is a gather of
``block_kv`` token rows (each row's slot from the block table), loaded into registers, converted
there (fp8 -> f16) and multiplied by Triton's ``dot`` (mma) with the G query rows padded to 16;
online softmax over the tiles in float32. Little shared memory and few registers a program, so
many programs an SM hide each other's load latency -- occupancy instead of a hand-built pipeline.
No split-K: it is meant for batches that fill the GPU by themselves (``triton_decode_wanted``);
batch 1 and long contexts stay on the Mosaic kernel.

Measured on an H100 (BENCHMARKS.md, twenty-first session; 1024 sequences x 160 tokens, 16-token
pages, loads not yet masked): bf16 pools 258 us (2.60 TB/s, 90% of a copy's roofline; the Mosaic
kernel's unswapped default 289), fp8 pools 190 us at block_kv 64 / 2 warps / 2 stages (the Mosaic
kernel's swap_ab default 196, its swap_ab + k_in_registers + lean_smem 166); more warps or 128-token
tiles are slower for fp8. In the 1000 x 128/128 run at 1024 rows: 26,365 output tok/s against
26,208 / 25,902 for the Mosaic default around it (decode calls 2.83 vs 2.84-2.85 s) -- within the
noise, so it stays opt-in (``JAXLLM_ATTN_TRITON=1``). ``masked_loads=True`` leaves the rows past a
sequence's length unread (a 64-token tile over 160 tokens reads 192): measured slower on an H200
(twenty-second session: fp8 at 64/2/2 184.5 vs 176.6 us at 160 tokens, 235.1 vs 225.0 at 256), so
off by default -- the rows read past the end are finite pool contents whose scores are masked.

Numerics as the Mosaic kernel's: fp8 pools computed in float16 (every e4m3 value is exact there),
the K scale folded into the softmax scale (or into q when traced), the V scale applied to the
output; scores in base 2. Masking by position (``< length``, inside the sliding window), so table
entries past a sequence's pages may hold any valid page id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .decode_attention import FP8, check_paged_args, log2_scores, tensor_core_q

MIN_DOT_ROWS = 16  # Triton's dot wants M >= 16


def _rows(g: int) -> int:
    """The padded query rows of a program: G rounded up to a power of two, at least 16."""
    return max(MIN_DOT_ROWS, 1 << (g - 1).bit_length())


def _load_rows(view, valid, masked: bool):
    """A gathered K / V tile [tile, d]: rows where `valid` (masked: the others not read, zeros), or
    every row (their page ids are valid ones whatever they hold; their scores are masked, so a
    finite value read there is multiplied by a probability of 0). Pallas' interpreter has no masked
    gather: interpret mode reads every row."""
    from jax.experimental.pallas import triton as pltriton

    if not masked:
        return view[...]
    return pltriton.load(view, mask=valid[:, None], other=jnp.zeros((), view.dtype), eviction_policy="evict_first")


def paged_decode_attention_triton(q, k_pool, v_pool, block_tables, lengths, block_size: int, *, sm_scale=None,
                                  soft_cap=None, sliding_window=None, k_scale=1.0, v_scale=1.0, block_kv: int = 64,
                                  num_warps: int = 2, num_stages: int = 2, masked_loads: bool = False,
                                  heads_fastest: bool = False, interpret: bool = False):
    """Decode attention over paged KV (see the module docstring). q [B, H, D]; pools [slots, KVH, D]
    (bfloat16, float16 or float8_e4m3fn holding K / k_scale and V / v_scale); block_tables [B, W]
    int32; lengths [B] int32 (>= 1). Returns [B, H, D] in q's dtype. ``block_kv``: tokens a tile (a
    power of two, >= 16); ``num_warps`` / ``num_stages``: Triton's. ``heads_fastest``: the KV heads,
    not the sequences, are the grid's fastest-varying axis (Triton's first, CUDA's x), so the
    programs running together read whole tokens' rows (see ``paged_decode_attention``'s)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    b, h, d = q.shape
    kvh = k_pool.shape[1]
    w = block_tables.shape[1]
    g = check_paged_args(h, kvh, block_size, None, k_pool, v_pool)
    if block_kv < 16 or block_kv & (block_kv - 1):
        raise ValueError(f"block_kv must be a power of two >= 16, got {block_kv}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton decode kernel, got {d}")
    kv_dtype = jnp.dtype(k_pool.dtype)
    dtype = jnp.dtype(jnp.float16) if kv_dtype == FP8 else kv_dtype  # what the tensor cores read
    rows = _rows(g)
    scale = d**-0.5 if sm_scale is None else sm_scale
    q_in, scale = tensor_core_q(q, scale, k_scale, dtype)
    q_rows = q_in.astype(dtype).reshape(b * h, d)
    tile = block_kv
    masked = masked_loads and not interpret

    def kernel(tables_ref, lens_ref, q_ref, k_ref, v_ref, o_ref):
        seq, head = (pl.program_id(1), pl.program_id(0)) if heads_fastest else (pl.program_id(0), pl.program_id(1))
        length = lens_ref[seq]
        r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
        first_row = seq * h + head * g
        qt = q_ref[first_row + jnp.minimum(r, g - 1), :]  # [rows, d]: rows past G repeat the last one
        if sliding_window is not None:
            win_lo = length - sliding_window
            start = lax.div(jnp.maximum(win_lo, 0), tile) * tile
        else:
            win_lo, start = None, 0
        n_steps = lax.div(length - start + tile - 1, tile)
        t_iota = lax.broadcasted_iota(jnp.int32, (tile,), 0)

        def body(i, carry):
            acc, m_i, l_i = carry
            pos = start + i * tile + t_iota  # [tile] token positions
            page = tables_ref[seq, jnp.minimum(lax.div(pos, block_size), w - 1)]
            slot = page * block_size + lax.rem(pos, block_size)
            valid = pos < length
            if win_lo is not None:
                valid = valid & (pos >= win_lo)
            # masked: tokens past the sequence (or before its window) are not read
            k = _load_rows(k_ref.at[slot, head, :], valid, masked).astype(dtype)  # [tile, d]
            s = lax.dot_general(qt, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = log2_scores(s, scale, soft_cap)
            s = jnp.where(valid[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))  # finite: every tile holds a valid token
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l_i = l_i * alpha + p.sum(axis=1)
            v = _load_rows(v_ref.at[slot, head, :], valid, masked).astype(dtype)
            pv = lax.dot_general(p.astype(dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_new, l_i

        init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, _, l_i = lax.fori_loop(0, n_steps, body, init)
        out = acc / l_i[:, None]
        # rows past G land in the next head's rows (or the padding) and are masked off (the
        # interpreter writes their old values back, before the next head's program runs: in order)
        pltriton.store(o_ref.at[pl.ds(first_row, rows), :], out.astype(o_ref.dtype), mask=(r < g)[:, None])

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b * h + rows, d), dtype),
        grid=(kvh, b) if heads_fastest else (b, kvh),  # the first axis varies fastest
        in_specs=[pl.BlockSpec()] * 5,  # whole arrays: loads index them
        out_specs=pl.BlockSpec(),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(block_tables.astype(jnp.int32), lengths.astype(jnp.int32), q_rows, k_pool, v_pool)
    out = out[: b * h].reshape(b, h, d)
    if not (isinstance(v_scale, (int, float)) and v_scale == 1.0):
        out = out.astype(jnp.float32) * v_scale
    return out.astype(q.dtype)
