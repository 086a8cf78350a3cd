"""Ragged paged prefill attention: many query tokens per sequence over its KV pages (Mosaic GPU).

Layout
------
* ``q [B, T, H, D]``: row b holds ``q_lens[b]`` query tokens at absolute positions
  ``q_start[b] + j`` (j < q_lens[b]); the rest of the row is padding. This is the engine's own
  prefill layout (``make_attend`` gets q padded per row and positions ``[B, T]`` that run on
  contiguously from the row's first position), so the kernel plugs in with no repacking: q_start
  is ``positions[:, 0]``, q_lens the row's valid count. A packed ``[N tokens]`` layout with
  ``cu_seqlens`` (vLLM) would save the padding FLOPs of short rows, but the engine pads rows to one
  bucketed length anyway, and query tiles past a row's length cost nothing here (no KV step runs
  for them), so the padded layout loses little and needs no new host-side plan.
* K and V pools ``[slots, kv_heads, D]`` as the runner keeps them (pages of ``block_size`` slots,
  a sequence's page ids in its row of ``block_tables [B, W]``). The chunk's own K/V are already in
  the pool (attend writes them first), so earlier context (chunked prefill, a cached prefix) and
  the new tokens are read the same way. Every KV position ``< q_start + q_lens`` is valid.

Why it is written this way
--------------------------
* Prefill attention is compute-bound (each KV byte meets up to 64 query rows of a tile), so the
  kernel is flash attention: one program (one warpgroup) per (query head, 64-query tile, row);
  scores and probabilities never leave the SM; online softmax in base 2 with the softmax scale
  folded into one multiply; both products on the tensor cores (wgmma, f32 accumulation).
* KV travels by TMA through the block table, one copy per page (several pages per 64-token tile
  when pages are small, several copies per page when they are large), into a ring of
  ``max_concurrent_steps`` shared-memory stages with one barrier each; a stage is refilled as soon
  as the wgmma that read it has completed -- the same ring as ``decode_attention``.
* Causal by absolute position: a tile only visits KV tiles up to its last valid query's position
  (tiles above the diagonal and past the context are never loaded); the tiles wholly below the
  diagonal run without a mask (a second loop masks the diagonal ones); with a sliding window the
  loop starts at the window's first page. Query tiles past a row's length run no KV step at all.
* Query tiles are visited last-first (the causal ones nearest the diagonal do the most work), and
  the heads vary fastest in the grid, so the G query heads of one KV head read the same pages at
  about the same time (from L2 after the first).
* GQA/MQA: each query head reads its KV head's pages; with 64 query rows per tile the tensor cores
  see full wgmma tiles whatever G is. (Packing the G heads of a KV head into one tile -- FA3's
  PackGQA -- would load each page once per KV head instead of once per query head from L2; worth
  measuring for short chunks.)
* FP8 pools: as in the decode kernel, pages travel as fp8 (half the bytes), each stage is converted
  into a float16 staging tile for wgmma (fp8 -> f16 is exact and needs no PTX ISA 9.2), and the K
  scale folds into the softmax scale, the V scale into the output.
* Query padding to a multiple of 64 tokens (done by the wrapper) keeps every TMA box in bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .decode_attention import (
    FP8,
    SMEM_BYTES,
    check_paged_args,
    fill_ring,
    page_copy,
    softmax_finish,
    softmax_start,
    softmax_step,
    staged_operand,
    step_scores,
    swizzled,
    tensor_core_q,
    tile_pages,
)

BLOCK_Q = 64  # query tokens per program (wgmma M)


def reference_prefill_attention(q, k_pool, v_pool, block_tables, q_start, q_lens, block_size, *, sm_scale=None,
                                sliding_window=None, soft_cap=None, k_scale=1.0, v_scale=1.0):
    """The same function in plain jnp, float32 throughout: q [B, T, H, D] -> [B, T, H, D] float32.

    Query j of row b sits at position q_start[b] + j and attends over positions p <= its own (and
    > its own - sliding_window); padding queries (j >= q_lens[b]) give zeros."""
    b, t, h, d = q.shape
    kvh = k_pool.shape[1]
    w = block_tables.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    slot_idx = (block_tables[:, :, None] * block_size + jnp.arange(block_size)).reshape(b, w * block_size)
    k = k_pool[slot_idx].astype(jnp.float32) * k_scale  # [B, S, KVH, D]
    v = v_pool[slot_idx].astype(jnp.float32) * v_scale
    qg = q.astype(jnp.float32).reshape(b, t, kvh, h // kvh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision="highest") * scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    qpos = q_start[:, None] + jnp.arange(t)  # [B, T]
    kpos = jnp.arange(w * block_size)
    mask = kpos[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v, precision="highest").reshape(b, t, h, d)
    real = jnp.arange(t)[None, :] < q_lens[:, None]
    return jnp.where(real[:, :, None, None], out, 0.0)


def _max_stages(d: int, tile: int, kv_bytes: int) -> int:
    """The most K/V stages that fit in shared memory beside Q (reused for O), P, the barriers and
    (fp8 pools) the two 16-bit staging tiles."""
    fixed = BLOCK_Q * d * 2 + BLOCK_Q * tile * 2 + 1024
    if kv_bytes == 1:
        fixed += 2 * tile * d * 2
    return (SMEM_BYTES - fixed) // (2 * tile * d * kv_bytes)


def paged_prefill_attention(q, k_pool, v_pool, block_tables, q_start, q_lens, block_size: int, *, sm_scale=None,
                            sliding_window=None, soft_cap=None, k_scale=1.0, v_scale=1.0, block_kv: int = 64,
                            max_concurrent_steps: int = 2, accumulate_in_place: bool | None = None,
                            interpret=False):
    """Causal attention of ragged query chunks over paged KV. q [B, T, H, D]; pools [slots, KVH, D];
    block_tables [B, W] int32; q_start [B], q_lens [B] int32 (query j of row b at position
    q_start[b] + j, valid for j < q_lens[b]; K/V of positions < q_start + q_lens in the pool).
    Returns [B, T, H, D] in q's dtype, zeros at padding queries.

    Pools are bfloat16, float16 or float8_e4m3fn; an fp8 pool holds K / k_scale and V / v_scale.

    ``accumulate_in_place`` (default: on the GPU, not in the interpreter): P @ V accumulates onto
    the rescaled output in its wgmma accumulator, instead of into a second [64, D] accumulator that
    is then added (twice the registers at head dim 256).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, t, h, d = q.shape
    kvh = k_pool.shape[1]
    w = block_tables.shape[1]
    g = check_paged_args(h, kvh, block_size, block_kv, k_pool, v_pool)
    if d % 64 or d > 256:
        raise ValueError(f"head_dim must be 64, 128, 192 or 256, got {d}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    kv_dtype = jnp.dtype(k_pool.dtype)
    fp8 = kv_dtype == FP8
    dtype = jnp.dtype(jnp.float16) if fp8 else kv_dtype  # what the tensor cores read
    tile = block_kv
    rows_per_copy = min(block_size, tile)
    copies = tile // rows_per_copy
    fit = _max_stages(d, tile, kv_dtype.itemsize)
    if fit < 2:
        raise ValueError(f"block_kv={tile} with head_dim {d} ({kv_dtype.name} pools) leaves no room for two stages "
                         f"in shared memory; use block_kv=64")
    max_steps = -(-w * block_size // tile) + 1
    stages = max(2, min(max_concurrent_steps, fit, max_steps))
    scale = d**-0.5 if sm_scale is None else sm_scale
    q_in, scale = tensor_core_q(q, scale, k_scale, dtype)
    n_qt = -(-t // BLOCK_Q)
    t_pad = n_qt * BLOCK_Q
    q_in = q_in.astype(dtype)
    if t_pad != t:
        q_in = jnp.pad(q_in, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    # On the GPU P @ V accumulates in place onto the rescaled output. The CPU interpreter batches
    # the grid, where a store into an accumulator fails, so there it adds a fresh one instead.
    in_place = not interpret if accumulate_in_place is None else accumulate_in_place
    q_start = q_start.astype(jnp.int32)
    q_lens = q_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)

    def kernel(tables_ref, start_ref, lens_ref, q_ref, k_ref, v_ref, o_ref, qo_smem, k_smem, v_smem, p_smem,
               q_bar, k_bar, v_bar, *staging):
        head = lax.axis_index("h")
        qt = n_qt - 1 - lax.axis_index("qt")  # heaviest (latest) tiles first
        seq = lax.axis_index("seq")
        kv_head = lax.div(head, g)
        t0 = qt * BLOCK_Q
        n_q = jnp.clip(lens_ref[seq] - t0, 0, BLOCK_Q)  # valid queries in this tile
        p_first = start_ref[seq] + t0  # position of the tile's first query
        hi = p_first + n_q  # one past the last KV position any valid query sees
        if sliding_window is not None:
            lo = jnp.maximum(p_first - sliding_window + 1, 0)
            start = lax.div(lo, rows_per_copy) * rows_per_copy
        else:
            start = jnp.int32(0)
        n_steps = jnp.where(n_q > 0, lax.div(hi - start + tile - 1, tile), 0)
        if sliding_window is None:  # steps wholly at or below every query's position: no mask
            n_full = jnp.clip(lax.div(p_first + 1 - start, tile), 0, n_steps)
        else:
            n_full = jnp.int32(0)

        plgpu.copy_gmem_to_smem(q_ref.at[seq, pl.ds(t0, BLOCK_Q), head], qo_smem, q_bar)

        def issue(step, slot):
            pages = tile_pages(tables_ref, seq, start + step * tile, copies, rows_per_copy, block_size, w)
            for j in range(copies):
                src, dst = page_copy(pages, start + step * tile, j, rows_per_copy, block_size)
                plgpu.copy_gmem_to_smem(k_ref.at[src, kv_head], k_smem.at[slot, dst], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[src, kv_head], v_smem.at[slot, dst], v_bar.at[slot])

        fill_ring(stages, n_steps, issue)

        plgpu.barrier_wait(q_bar)
        acc, m_i, l_i = softmax_start(BLOCK_Q, d)
        operand = staged_operand(staging, fp8, dtype)

        def body(step, carry, masked):
            acc, m_i, l_i = carry
            slot, s = step_scores(step, stages, n_steps, issue, k_bar, k_smem, operand, qo_smem, BLOCK_Q, tile,
                                  scale, soft_cap)
            if masked:
                kpos = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, tile), 1, layout=plgpu.Layout.WGMMA)
                qpos = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, tile), 0, layout=plgpu.Layout.WGMMA)
                kpos = kpos + (start + step * tile)
                qpos = qpos + p_first
                valid = kpos <= qpos
                if sliding_window is not None:
                    valid = valid & (kpos > qpos - sliding_window)
                s = jnp.where(valid, s, -jnp.inf)
            m_new, alpha, p, l_i = softmax_step(s, m_i, l_i, may_be_empty=masked)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bar.at[slot])
            v_op = operand(v_smem, slot, 1)

            def pv_scope(acc_ref):
                if in_place:  # accumulate onto the rescaled output: no second [64, D] accumulator
                    acc_ref[...] = acc
                plgpu.wgmma(acc_ref, p_smem, v_op)
                return acc_ref[...]

            pv = pl.run_scoped(pv_scope, plgpu.ACC((BLOCK_Q, d), jnp.float32))
            acc = pv if in_place else acc + pv
            return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, n_full, lambda s, c: body(s, c, False), carry)
        acc, m_i, l_i = lax.fori_loop(n_full, n_steps, lambda s, c: body(s, c, True), carry)
        out, _ = softmax_finish(acc, l_i)
        row = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, d), 0, layout=plgpu.Layout.WGMMA)
        out = jnp.where(row < n_q, out, 0.0)  # padding queries: zeros
        qo_smem[...] = out.astype(dtype)  # every wgmma that read Q has completed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[seq, pl.ds(t0, BLOCK_Q), head])
        plgpu.wait_smem_to_gmem(0)

    transforms = swizzled(d, 2)
    kv_transforms = swizzled(d, kv_dtype.itemsize)
    p_swizzle = min(128, tile * 2)
    p_transforms = (plgpu.TilingTransform((8, p_swizzle // 2)), plgpu.SwizzleTransform(p_swizzle))
    scratch = (  # in the order of the kernel's scratch arguments
        plgpu.SMEM((BLOCK_Q, d), dtype, transforms=transforms),  # qo_smem: Q, then O
        plgpu.SMEM((stages, tile, d), kv_dtype, transforms=kv_transforms),  # k_smem
        plgpu.SMEM((stages, tile, d), kv_dtype, transforms=kv_transforms),  # v_smem
        plgpu.SMEM((BLOCK_Q, tile), dtype, transforms=p_transforms),  # p_smem
        plgpu.Barrier(num_arrivals=1),  # q_bar
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # k_bar
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # v_bar
    )
    if fp8:  # the 16-bit staging tiles of K and V
        scratch += (plgpu.SMEM((tile, d), dtype, transforms=transforms),) * 2
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((b, t_pad, h, d), dtype),
        grid=(h, n_qt, b),
        grid_names=("h", "qt", "seq"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(block_tables, q_start, q_lens, q_in, k_pool, v_pool)
    out = out[:, :t]
    if not (isinstance(v_scale, (int, float)) and v_scale == 1.0):
        out = out.astype(jnp.float32) * v_scale
    return out.astype(q.dtype)
