"""A greedy decode step's sampling and row bookkeeping in two small kernels (Pallas, Triton backend).

Why: after the LM head a batch-1 decode step ran ~17 small XLA kernels of ~1-2 us each (~25 us of a
3.3 ms step on an H100, BENCHMARKS.md "Eighteenth session"): the min_tokens scatter, argmax and
log_softmax's reductions, the chosen logprob, the stop check and the row state's updates. For the
common case -- every row greedy, no penalties, no bad words, no logprobs asked beyond the chosen
token's -- this computes the same in two launches: ``_partials`` (a program per row and block of
the vocabulary: the block's max, its first argmax and its sum of exponentials, stop tokens
forbidden before min_tokens) and ``_finish`` (a program per row: the row's token and its
log_softmax, then the row state as ModelRunner._advance updates it, in place). In the decode loop
the second also writes the token and its logprob into the loop's output columns in place: measured
on an H100 (BENCHMARKS.md "Nineteenth session"), a first form returning fresh arrays saved ~7 us of
kernels a step and lost it again to ~5 copies into the loop's buffers and two dtype conversions.

Numerics: the token is jnp.argmax's (the first maximum); the logprob is log_softmax's value at it,
-log(sum(exp(x - max))), whose sum runs in another order (float32 rounding apart, the same).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..sampling import advance_rows, forbid_stops_before_min

BIG = 2**31 - 1  # an index past every vocabulary
MIN_BLOCK = 64  # the vocabulary's blocks: a power of two dividing V, at least this


def greedy_fits(v: int) -> bool:
    """Whether greedy_advance serves a vocabulary of v (blocks of a power of two that divides it)."""
    return v % MIN_BLOCK == 0


def reference_greedy_advance(logits, stop_ids, tokens, positions, num_generated, min_tokens, max_tokens, done,
                             out=None, out_lp=None, step=None):
    """The same in plain jnp, as ModelRunner._advance computes it for greedy rows: (tokens out [B]
    (-1 for rows already done), the chosen tokens' logprobs [B], then the row state's tokens,
    positions, num_generated and done). With `out` / `out_lp` [B, S] and `step`: those two written
    into column `step` of them instead (the decode loop's outputs)."""
    x = forbid_stops_before_min(logits.astype(jnp.float32), stop_ids, num_generated, min_tokens)
    tok =  jnp.argmax(x, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tok[:, None], axis=-1)[:, 0]
    tok_out, *state = advance_rows(tok, stop_ids, tokens, positions, num_generated, max_tokens, done)
    if out is not None:
        tok_out = jax.lax.dynamic_update_slice(out, tok_out[:, None], (0, step))
        lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
    return (tok_out, lp, *state)


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def greedy_advance(logits, stop_ids, tokens, positions, num_generated, min_tokens, max_tokens, done,
                   out=None, out_lp=None, step=None, *, block_v: int = 4096, num_warps: int = 8,
                   interpret: bool = False):
    """reference_greedy_advance in two kernels. logits [B, V] float32; stop_ids [B, K] int32 (ids
    >= V: padding); tokens, positions, num_generated, min_tokens, max_tokens [B] int32; done [B]
    bool. `block_v`: vocabulary entries a program of the first kernel reduces (a power of two).

    The second kernel updates the row state in place (tokens, positions, num_generated and done
    are aliased to its outputs), and with `out` [B, S] int32, `out_lp` [B, S] float32 and `step`
    (an int32 scalar) writes the token and its logprob into column `step` of those, in place: a
    decode loop's state and outputs then take no copies and no update kernels."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    b, v = logits.shape
    k = stop_ids.shape[1]
    block_v = min(block_v, v & -v)  # a power of two dividing V: every block whole
    into = out is not None
    if (not greedy_fits(v) or block_v & (block_v - 1) or stop_ids.shape[0] != b
            or (into and (out_lp is None or step is None or out.shape[0] != b or out_lp.shape != out.shape))):
        raise ValueError(f"greedy_advance: logits {logits.shape}, stop_ids {stop_ids.shape}, block_v {block_v}"
                         f"{f', out {out.shape}' if into else ''}: expected [B, V] with V a multiple of {MIN_BLOCK}, "
                         "[B, K], block_v a power of two (and out / out_lp [B, S] with a step)")
    blocks = v // block_v
    width = 1 << max(blocks - 1, 0).bit_length()  # the finish kernel's block: a power of two
    kp = 1 << max(k - 1, 0).bit_length()
    stop = jnp.pad(stop_ids.astype(jnp.int32), ((0, 0), (0, kp - k)), constant_values=BIG)
    f32, i32 = jnp.float32, jnp.int32
    params = pltriton.CompilerParams(num_warps=num_warps)

    def partials(x_ref, stop_ref, num_ref, min_ref, m_ref, a_ref, s_ref):
        r, c = pl.program_id(0), pl.program_id(1)
        ids = c * block_v + jax.lax.broadcasted_iota(i32, (1, block_v), 1)
        x = x_ref[pl.ds(r, 1), pl.ds(pl.multiple_of(c * block_v, block_v), block_v)].astype(f32)
        blocked = num_ref[pl.ds(r, 1)] < min_ref[pl.ds(r, 1)]  # [1]: stop tokens forbidden (min_tokens)
        hit = jnp.zeros((1, block_v), jnp.bool_)
        for j in range(kp):  # a few stop ids a row
            hit = hit | (ids == stop_ref[pl.ds(r, 1), pl.ds(j, 1)])
        x = jnp.where(hit & blocked[:, None], -jnp.inf, x)
        m = jnp.max(x)
        a = jnp.min(jnp.where(x == m, ids, BIG))
        s = jnp.where(m == -jnp.inf, 0.0, jnp.sum(jnp.exp(x - m)))
        m_ref[pl.ds(r, 1), pl.ds(c, 1)] = jnp.full((1, 1), m, f32)
        a_ref[pl.ds(r, 1), pl.ds(c, 1)] = jnp.full((1, 1), a, i32)
        s_ref[pl.ds(r, 1), pl.ds(c, 1)] = jnp.full((1, 1), s, f32)

    m, a, s = pl.pallas_call(
        partials,
        out_shape=(jax.ShapeDtypeStruct((b, width), f32), jax.ShapeDtypeStruct((b, width), i32),
                   jax.ShapeDtypeStruct((b, width), f32)),
        grid=(b, blocks),
        in_specs=[pl.BlockSpec()] * 4,
        out_specs=[pl.BlockSpec()] * 3,
        compiler_params=params,
        interpret=interpret,
    )(logits, stop, num_generated.astype(i32), min_tokens.astype(i32))

    def finish(m_ref, a_ref, s_ref, stop_ref, max_ref, step_ref, *refs):
        # refs: the aliased inputs (tokens, positions, num, done[, out, out_lp]), then the outputs
        tok_ref, pos_ref, num_ref, done_ref = refs[:4]
        tok_o, pos_o, num_o, done_o, out_ref, lp_ref = refs[6 if into else 4:]
        r = pl.program_id(0)
        row = pl.ds(r, 1)
        cols = jax.lax.broadcasted_iota(i32, (1, width), 1) < blocks  # the blocks this row has
        mm = jnp.where(cols, m_ref[row, :], -jnp.inf)
        top = jnp.max(mm)
        tok = jnp.min(jnp.where(cols & (mm == top), a_ref[row, :], BIG))
        total = jnp.sum(jnp.where(cols & (mm > -jnp.inf), s_ref[row, :] * jnp.exp(mm - top), 0.0))
        lp = jnp.full((1,), -jnp.log(total), f32)
        tok1 = jnp.full((1,), tok, i32)
        out, tokens, pos, num, dn = advance_rows(tok1, stop_ref[row, :], tok_ref[row], pos_ref[row], num_ref[row],
                                                 max_ref[row], done_ref[row])
        tok_o[row], pos_o[row], num_o[row], done_o[row] = tokens, pos, num, dn
        if into:  # column `step` of the loop's outputs
            col = (row, pl.ds(step_ref[0], 1))
            out_ref[col], lp_ref[col] = out[:, None], lp[:, None]
        else:
            out_ref[row], lp_ref[row] = out, lp

    vec = lambda dt: jax.ShapeDtypeStruct((b,), dt)  # noqa: E731
    state = (tokens.astype(i32), positions.astype(i32), num_generated.astype(i32), done.astype(jnp.bool_))
    outs = (out.astype(i32), out_lp.astype(f32)) if into else ()
    out_shape = (vec(i32), vec(i32), vec(i32), vec(jnp.bool_)) + (
        tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs) if into else (vec(i32), vec(f32)))
    step = jnp.reshape(jnp.asarray(0 if step is None else step, i32), (1,))
    aliased = state + outs
    tok, pos, num, dn, out, lp = pl.pallas_call(
        finish,
        out_shape=out_shape,
        grid=(b,),
        in_specs=[pl.BlockSpec()] * (6 + len(aliased)),
        out_specs=[pl.BlockSpec()] * 6,
        input_output_aliases={6 + j: j for j in range(len(aliased))},  # in place: no copies in a loop
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=interpret,
    )(m, a, s, stop, max_tokens.astype(i32), step, *aliased)
    return out, lp, tok, pos, num, dn
