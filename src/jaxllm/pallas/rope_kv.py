"""A decode step's q/k/v epilogue in one kernel (Pallas, Triton backend): the fused q/k/v
projection's result finished (split-K partial sums added, per-token and per-channel scales
applied, rounded to the activations' dtype), RoPE applied to q and k, and k and v stored into the
paged KV pools at the rows' slots (an fp8 pool's values scaled and saturated as ``to_pool`` does).

Why: under XLA these are three kernels a layer -- a dynamic-update-slice (or a scatter) into each
pool, with k's RoPE fused into one, and q's RoPE -- each re-reading the projection's partials;
at batch 1 ~5.4 µs a layer of launches for ~20 KB of data (an H200 profile). Here one program per
(row, KV head) reads its G + 2 head rows once and writes q's G rows and one k and one v row.
Measured on an H100 (BENCHMARKS.md "Sixteenth session"): fp8 batch 1 3.62 -> 3.60 ms, 1000 x
128/128 at 1024 rows +0.8% (within the noise): at one row its eight programs' dependent loads are
latency, so the launch it saves is most of the gain.

Numerics are the unfused path's step for step (models/llama.py ``apply_rope``, runner/paged.py
``to_pool``, models/quant.py ``Partials.total`` / ``Scaled.value``): sums and scales in float32,
rounded to `dtype`, then RoPE in float32 from the rounded values with the caller's cos / sin,
rounded again; so on a CPU (interpret mode) the results are the reference's exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..kv_cache_config import FP8_MAX


def rope_kv_fits(parts_shape: tuple, group: int) -> bool:
    """Whether the kernel serves parts [S, R, KVH, G + 2, D]: Triton blocks are powers of two (S,
    G and D / 2)."""
    if len(parts_shape) != 5:
        return False
    s, _, _, gp2, d = parts_shape
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return gp2 == group + 2 and pow2(s) and pow2(group) and d % 2 == 0 and pow2(d // 2) and d >= 32


def _finish(parts, row_scale, col_scale, dtype):
    """The projection's values from its parts [S, ..., N'] (float32 sums, scales, rounded)."""
    x = jnp.sum(parts.astype(jnp.float32), axis=0)
    if row_scale is not None:
        x = x * row_scale
    if col_scale is not None:
        x = x * col_scale
    return x.astype(dtype)


def _rotate(x1, x2, cos, sin, dtype):
    """apply_rope's arithmetic on the two halves x1, x2 of x (computed in float32), each rounded to
    dtype: the one form of it that the reference and both kernels use."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _rope(x, cos, sin, dtype):
    """apply_rope's arithmetic on x [..., D] (dtype) with cos / sin [..., D / 2], rounded to dtype."""
    return jnp.concatenate(_rotate(*jnp.split(x, 2, axis=-1), cos, sin, dtype), axis=-1)


def _to_pool(x, pool_dtype, scale: float):
    """runner/paged.py to_pool's arithmetic (fp8: x / scale saturated to +-448; else a cast)."""
    if jnp.dtype(pool_dtype) != jnp.float8_e4m3fn:
        return x.astype(pool_dtype)
    x = x.astype(jnp.float32)
    if scale != 1.0:
        x = x / scale
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(pool_dtype)


def reference_rope_kv_write(parts, cos, sin, slots, k_pool, v_pool, row_scale=None, col_scale=None, *, group: int,
                            dtype, k_scale: float = 1.0, v_scale: float = 1.0):
    """The same in plain jnp: parts [S, R, KVH, G + 2, D] (a fused q/k/v projection's split-K
    partials, or its one product: S = 1), row_scale [R] or None, col_scale [KVH, G + 2, D] or None,
    cos / sin [R, D / 2] float32, slots [R] (-1: padding, not written), pools [P, KVH, D] ->
    (q [R, KVH * G, D] roped, k_pool, v_pool)."""
    _, r, kvh, _, d = parts.shape
    qkv = _finish(parts, None if row_scale is None else row_scale[:, None, None, None], col_scale, dtype)
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    q = _rope(qkv[:, :, :group], c, s, dtype).reshape(r, kvh * group, d)
    k = _to_pool(_rope(qkv[:, :, group], cos[:, None, :], sin[:, None, :], dtype), k_pool.dtype, k_scale)
    v = _to_pool(qkv[:, :, group + 1], v_pool.dtype, v_scale)
    n = k_pool.shape[0]
    idx = jnp.where(slots < 0, n + jnp.arange(r, dtype=slots.dtype), slots)  # padding: past the pool, dropped
    k_pool = k_pool.at[idx].set(k, mode="drop", unique_indices=True)
    v_pool = v_pool.at[idx].set(v, mode="drop", unique_indices=True)
    return q, k_pool, v_pool


@functools.partial(jax.jit, static_argnames=("group", "dtype", "k_scale", "v_scale", "num_warps", "interpret"))
def rope_kv_write(parts, cos, sin, slots, k_pool, v_pool, row_scale=None, col_scale=None, *, group: int, dtype,
                  k_scale: float = 1.0, v_scale: float = 1.0, num_warps: int = 4, interpret: bool = False):
    """reference_rope_kv_write in one kernel: grid (rows, KV heads); each program finishes its KV
    head's G + 2 rows of the projection, ropes q and k, stores q and (unless its slot is padding,
    < 0) k and v in the pools, which are updated in place (aliased)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if not rope_kv_fits(parts.shape, group):
        raise ValueError(f"rope_kv_write: parts {parts.shape} with group {group}: expected [S, R, KVH, G + 2, D] with "
                         "S, G and D / 2 powers of two")
    ns, r, kvh, gp2, d = parts.shape
    half = d // 2
    if k_pool.shape[1:] != (kvh, d) or v_pool.shape != k_pool.shape or cos.shape != (r, half) or sin.shape != (r, half):
        raise ValueError(f"rope_kv_write: pools {k_pool.shape} / {v_pool.shape}, cos {cos.shape}, sin {sin.shape} do not "
                         f"match parts {parts.shape} ([P, {kvh}, {d}] pools, [{r}, {half}] cos / sin)")
    halves = parts.reshape(ns, r, kvh, gp2, 2, half)  # the two halves RoPE pairs (free reshapes)
    kp, vp = (p.reshape(p.shape[0], kvh, 2, half) for p in (k_pool, v_pool))
    with_row, with_col = row_scale is not None, col_scale is not None
    operands = [halves, cos.astype(jnp.float32), sin.astype(jnp.float32), slots.astype(jnp.int32)]
    if with_row:
        operands.append(row_scale.reshape(r).astype(jnp.float32))
    if with_col:
        operands.append(col_scale.reshape(kvh, gp2, 2, half).astype(jnp.float32))
    first_pool = len(operands)
    operands += [kp, vp]

    def kernel(*refs):
        x_ref, cos_ref, sin_ref, slot_ref = refs[:4]
        rs_ref = refs[4] if with_row else None
        cs_ref = refs[4 + with_row] if with_col else None
        q_ref, k_out, v_out = refs[-3:]
        row, h = pl.program_id(0), pl.program_id(1)
        c, s = cos_ref[row, :][None, :], sin_ref[row, :][None, :]  # [1, half]

        def value(j, n, i):  # head rows j..j+n's half i, finished: [n, half] in dtype
            x = jnp.sum(x_ref[:, row, h, pl.ds(j, n), i, :].astype(jnp.float32), axis=0)
            if with_row:
                x = x * rs_ref[row]
            if with_col:
                x = x * cs_ref[h, pl.ds(j, n), i, :]
            return x.astype(dtype)

        def roped(j, n):  # rows j..j+n roped: their two halves in dtype
            return _rotate(value(j, n, 0), value(j, n, 1), c, s, dtype)

        q1, q2 = roped(0, group)
        q_ref[row, pl.ds(h * group, group), 0, :] = q1
        q_ref[row, pl.ds(h * group, group), 1, :] = q2
        slot = slot_ref[row]

        @pl.when(slot >= 0)
        def _():
            k1, k2 = roped(group, 1)
            head = pl.ds(h, 1)  # [1, half] rows
            k_out[slot, head, 0, :] = _to_pool(k1, k_out.dtype, k_scale)
            k_out[slot, head, 1, :] = _to_pool(k2, k_out.dtype, k_scale)
            v_out[slot, head, 0, :] = _to_pool(value(group + 1, 1, 0), v_out.dtype, v_scale)
            v_out[slot, head, 1, :] = _to_pool(value(group + 1, 1, 1), v_out.dtype, v_scale)

    q, kp, vp = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((r, kvh * group, 2, half), dtype),
                   jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)),
        grid=(r, kvh),
        in_specs=[pl.BlockSpec()] * len(operands),  # whole arrays: loads and stores index them
        out_specs=[pl.BlockSpec()] * 3,
        input_output_aliases={first_pool: 1, first_pool + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(*operands)
    return q.reshape(r, kvh * group, d), kp.reshape(k_pool.shape), vp.reshape(v_pool.shape)


@functools.partial(jax.jit, static_argnames=("group", "dtype", "k_scale", "v_scale", "block_n", "block_k", "num_warps",
                                             "interpret"))
def gemv_rope_kv_write(x, w, scale, cos, sin, slots, k_pool, v_pool, *, group: int, dtype, k_scale: float = 1.0,
                       v_scale: float = 1.0, block_n: int = 2, block_k: int = 2048, num_warps: int = 1,
                       interpret: bool = False):
    """The fused q/k/v projection of one row and rope_kv_write's epilogue in one kernel: x [1, K]
    times an fp8 weight stored [N, K] (N = KVH * (G + 2) * D, per-channel `scale` [N] or None), one
    split; each program computes `block_n` RoPE pairs of one head row (columns c.. and D / 2 + c..,
    rows of w D / 2 apart), rounds them to `dtype` as the projection's own epilogue does, ropes q
    and k with cos / sin [1, D / 2], and writes q, or k / v into the pools at slots[0] (unless < 0)
    -- no partial sums in memory, no second kernel. The reference is rope_kv_write of the one-split
    product (pallas.gemv's direct result): bit for bit in interpret mode."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    kvh, d = k_pool.shape[1:]
    half, gp2 = d // 2, group + 2
    n = kvh * gp2 * d
    if (m != 1 or w.shape != (n, k) or k % block_k or half % block_n or cos.shape != (1, half)
            or sin.shape != (1, half) or v_pool.shape != k_pool.shape):
        raise ValueError(f"gemv_rope_kv_write: x {x.shape}, w {w.shape}, pools {k_pool.shape}, cos {cos.shape}: expected "
                         f"one row, w [{n}, K] (K % block_k == 0), [1, {half}] cos / sin, D / 2 % block_n == 0")
    steps = k // block_k
    kp, vp = (p.reshape(p.shape[0], kvh, 2, half) for p in (k_pool, v_pool))
    with_scale = scale is not None
    operands = [x, w] + ([scale.reshape(n).astype(jnp.float32)] if with_scale else []) + [
        cos.astype(jnp.float32), sin.astype(jnp.float32), slots.reshape(1).astype(jnp.int32), kp, vp]
    first_pool = len(operands) - 2

    def kernel(x_ref, w_ref, *refs):
        s_ref = refs[0] if with_scale else None
        cos_ref, sin_ref, slot_ref = refs[with_scale : with_scale + 3]
        q_ref, k_out, v_out = refs[-3:]
        hr, cc = pl.program_id(0), pl.program_id(1)
        h, j = jax.lax.div(hr, gp2), jax.lax.rem(hr, gp2)  # KV head; its row: q heads, then k, then v
        c0 = pl.multiple_of(cc * block_n, block_n)
        halves = (pl.ds(pl.multiple_of(hr * d + c0, block_n), block_n),
                  pl.ds(pl.multiple_of(hr * d + half + c0, block_n), block_n))

        def body(i, acc):
            off = pl.multiple_of(i * block_k, block_k)
            xs = x_ref[0, pl.ds(off, block_k)].astype(jnp.float32)
            return tuple(a + jnp.sum(w_ref[rows, pl.ds(off, block_k)].astype(jnp.float32) * xs[None, :], axis=1)[None]
                         for a, rows in zip(acc, halves))

        zero = jnp.zeros((1, block_n), jnp.float32)
        acc = jax.lax.fori_loop(0, steps, body, (zero, zero))
        if with_scale:
            acc = tuple(a * s_ref[rows].astype(jnp.float32)[None] for a, rows in zip(acc, halves))
        x1, x2 = (a.astype(dtype) for a in acc)  # the projection's values, as its epilogue rounds them
        c, s = cos_ref[0, pl.ds(c0, block_n)][None, :], sin_ref[0, pl.ds(c0, block_n)][None, :]
        r1, r2 = _rotate(x1, x2, c, s, dtype)
        cols = pl.ds(c0, block_n)
        slot = slot_ref[0]

        @pl.when(j < group)
        def _():
            head = pl.ds(h * group + j, 1)
            q_ref[0, head, 0, cols] = r1
            q_ref[0, head, 1, cols] = r2

        @pl.when((j == group) & (slot >= 0))
        def _():
            k_out[slot, pl.ds(h, 1), 0, cols] = _to_pool(r1, k_out.dtype, k_scale)
            k_out[slot, pl.ds(h, 1), 1, cols] = _to_pool(r2, k_out.dtype, k_scale)

        @pl.when((j == group + 1) & (slot >= 0))
        def _():
            v_out[slot, pl.ds(h, 1), 0, cols] = _to_pool(x1, v_out.dtype, v_scale)
            v_out[slot, pl.ds(h, 1), 1, cols] = _to_pool(x2, v_out.dtype, v_scale)

    q, kp, vp = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((1, kvh * group, 2, half), dtype),
                   jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)),
        grid=(kvh * gp2, half // block_n),
        in_specs=[pl.BlockSpec()] * len(operands),
        out_specs=[pl.BlockSpec()] * 3,
        input_output_aliases={first_pool: 1, first_pool + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(*operands)
    return q.reshape(1, kvh * group, d), kp.reshape(k_pool.shape), vp.reshape(v_pool.shape)
