"""The model runner: padded device arrays in, tokens out, through two jitted pure functions.

* ``prefill``: one chunk of tokens per row (a whole prompt, a piece of a long prompt, or the part
  of a prompt past a reused prefix) at given positions; writes their K/V into the paged pool and
  samples each row's next token (the engine keeps it only for rows whose prompt is complete).
* ``decode``: up to ``steps`` decode steps in one device call (a ``while_loop``): sampling,
  EOS / stop-token and max_tokens checks all stay on device, and the loop ends early once every
  row is done. The host sees tokens once per call, not once per token.

Both are pure (parameters, pool and per-row state in; new pool and state out) and donate the pool,
so XLA updates it in place. The runner holds the pool between calls. Shapes come from a few
buckets (powers of two) so a handful of compilations serve every batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ..models import ModelConfig
from ..sampling import SamplingArrays, sample
from .paged import init_pool, make_attend, pool_sharding, slots_for


@jax.tree_util.register_dataclass
@dataclass
class RowState:
    """Per-row decoding state, [B] each unless noted."""

    tokens: jax.Array  # last token: the next step's input
    positions: jax.Array  # position of `tokens`
    num_generated: jax.Array
    max_tokens: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array  # [B, K] ids that end the row (EOS and stop_token_ids); vocab_size = padding
    done: jax.Array  # bool
    sampling: SamplingArrays


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at maximum."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum) if maximum is not None else b


class ModelRunner:
    def __init__(
        self, model: nnx.Module, cfg: ModelConfig, dtype, num_blocks: int, block_size: int, mesh, kv_dtype=None
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.graphdef, self.params = nnx.split(model)
        # Placed on the mesh from the start, like every pool the step functions return: a first pool
        # with another sharding would make each step shape compile twice.
        self.pool = jax.jit(
            lambda: init_pool(cfg, num_blocks, block_size, self.kv_dtype), out_shardings=pool_sharding(cfg, mesh)
        )()
        self._prefill = jax.jit(self._prefill_impl, donate_argnames=("pool",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("steps",), donate_argnames=("pool",))

    # -- pure functions (traced) -------------------------------------------------------------
    def _forward(self, params, pool, tokens, positions, valid, block_tables):
        model = nnx.merge(self.graphdef, params)
        slots = slots_for(positions, block_tables, self.block_size, valid)
        attend = make_attend(positions, slots, block_tables, self.block_size, self.cfg.sliding_window)
        hidden, pool = model(tokens, positions, pool, attend)
        return model, hidden, pool

    def _advance(self, state: RowState, logits):
        """Sample the next token of every row from logits [B, V] and update stop bookkeeping."""
        rows = jnp.arange(logits.shape[0])[:, None]
        # Before min_tokens, tokens that would end the row are not allowed.
        block = (state.num_generated < state.min_tokens)[:, None]
        stop_ids = jnp.where(block, state.stop_ids, self.cfg.vocab_size)
        logits = logits.at[rows, stop_ids].set(-jnp.inf, mode="drop")
        next_pos = state.positions + 1
        tok, logprob = sample(logits, state.sampling, next_pos)
        active = ~state.done
        num = state.num_generated + active.astype(jnp.int32)
        hit_stop = jnp.any(tok[:, None] == state.stop_ids, axis=-1)
        done = state.done | (active & (hit_stop | (num >= state.max_tokens)))
        new = dataclasses.replace(
            state,
            tokens=jnp.where(active, tok, state.tokens),
            positions=jnp.where(active, next_pos, state.positions),
            num_generated=num,
            done=done,
        )
        return new, jnp.where(active, tok, -1), logprob

    def _prefill_impl(self, params, pool, tokens, positions, valid, block_tables, last_idx, state: RowState):
        model, hidden, pool = self._forward(params, pool, tokens, positions, valid, block_tables)
        last = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)[:, 0]
        last_pos = jnp.take_along_axis(positions, last_idx[:, None], axis=1)[:, 0]
        state = dataclasses.replace(state, positions=last_pos)
        _, tok, logprob = self._advance(state, model.logits(last))
        return pool, tok, logprob

    def _decode_impl(self, params, pool, block_tables, state: RowState, steps: int):
        b = state.tokens.shape[0]
        out = jnp.full((b, steps), -1, jnp.int32)
        out_lp = jnp.zeros((b, steps), jnp.float32)

        def cond(carry):
            i, _, st, _, _ = carry
            return (i < steps) & ~jnp.all(st.done)

        def body(carry):
            i, pool, st, out, out_lp = carry
            pos = st.positions[:, None]
            model, hidden, pool = self._forward(params, pool, st.tokens[:, None], pos, ~st.done[:, None], block_tables)
            st, tok, lp = self._advance(st, model.logits(hidden[:, 0]))
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
            return i + 1, pool, st, out, out_lp

        _, pool, state, out, out_lp = jax.lax.while_loop(cond, body, (jnp.int32(0), pool, state, out, out_lp))
        return pool, state, out, out_lp

    # -- host-facing API ---------------------------------------------------------------------
    def prefill(self, tokens, positions, valid, block_tables, last_idx, state: RowState):
        """Run one chunk per row; returns (next token [B], its logprob [B]) as device arrays."""
        self.pool, tok, logprob = self._prefill(
            self.params, self.pool, tokens, positions, valid, block_tables, last_idx, state
        )
        return tok, logprob

    def decode(self, block_tables, state: RowState, steps: int):
        """Run up to `steps` decode steps; returns (state, tokens [B, steps] (-1: none), logprobs)."""
        self.pool, state, toks, lps = self._decode(self.params, self.pool, block_tables, state, steps=steps)
        return state, toks, lps

    def hidden_states(self, tokens):
        """Final hidden states and float32 logits for prompts [B, T] from position 0 (tests, scoring).

        Uses a scratch pool of its own, so the serving pool is untouched.
        """
        b, t = tokens.shape
        nb = -(-t // self.block_size)
        tables = jnp.arange(b * nb, dtype=jnp.int32).reshape(b, nb)
        pool = init_pool(self.cfg, b * nb, self.block_size, self.kv_dtype)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        model, hidden, _ = self._forward(self.params, pool, tokens, positions, jnp.ones((b, t), bool), tables)
        return hidden, model.logits(hidden)

    def release(self) -> None:
        """Free the device memory of the parameters and the pool."""
        for leaf in jax.tree.leaves((self.params, self.pool)):
            if hasattr(leaf, "delete"):
                leaf.delete()
        self.pool = None

