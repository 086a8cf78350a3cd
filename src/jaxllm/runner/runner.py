"""The model runner: padded device arrays in, tokens out, through two jitted pure functions.

* ``prefill(params, cache, tokens [B, T], prompt_lens [B], state)`` runs the prompts, writes their K/V
  and samples each row's first token.
* ``decode(params, cache, state, steps)`` runs up to ``steps`` decode steps in one device call (a
  ``while_loop``): sampling, EOS / stop-token and max_tokens checks all stay on device, and the loop
  ends early once every row is done. The host sees tokens once per call, not once per token.

Both are pure (parameters, cache and per-row state in; new cache and state out) and donate the
cache, so XLA updates it in place. Shapes come from a few buckets (powers of two) so a handful of
compilations serve every batch; the persistent compilation cache makes them cheap across runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ..models import ModelConfig
from ..sampling import SamplingArrays, sample
from .kv_cache import init_cache, make_attend


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """Per-row decoding state, [B] each unless noted."""

    tokens: jax.Array  # last sampled token: the next step's input
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
    def __init__(self, model: nnx.Module, cfg: ModelConfig, dtype):
        self.cfg = cfg
        self.dtype = dtype
        self.graphdef, self.params = nnx.split(model)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("seq_len",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("steps",), donate_argnames=("cache", "state"))

    # -- pure functions (traced) -------------------------------------------------------------
    def _forward(self, params, tokens, positions, cache):
        model = nnx.merge(self.graphdef, params)
        attend = make_attend(positions, self.cfg.sliding_window)
        hidden, cache = model(tokens, positions, cache, attend)
        return model, hidden, cache

    def _advance(self, state: DecodeState, logits):
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
        return dataclasses.replace(
            state,
            tokens=jnp.where(active, tok, state.tokens),
            positions=jnp.where(active, next_pos, state.positions),
            num_generated=num,
            done=done,
        ), jnp.where(active, tok, -1), logprob

    def _prefill_impl(self, params, tokens, prompt_lens, state: DecodeState, seq_len: int):
        b, t = tokens.shape
        cache = init_cache(self.cfg, b, seq_len, self.dtype)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        model, hidden, cache = self._forward(params, tokens, positions, cache)
        last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
        # _advance samples the token after each row's last prompt token
        state = dataclasses.replace(state, positions=prompt_lens - 1)
        state, tok, logprob = self._advance(state, model.logits(last))
        return cache, state, tok, logprob

    def _decode_impl(self, params, cache, state: DecodeState, steps: int):
        b = state.tokens.shape[0]
        out = jnp.full((b, steps), -1, jnp.int32)
        out_lp = jnp.zeros((b, steps), jnp.float32)

        def cond(carry):
            i, _, st, _, _ = carry
            return (i < steps) & ~jnp.all(st.done)

        def body(carry):
            i, cache, st, out, out_lp = carry
            model, hidden, cache = self._forward(params, st.tokens[:, None], st.positions[:, None], cache)
            st, tok, lp = self._advance(st, model.logits(hidden[:, 0]))
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i))
            return i + 1, cache, st, out, out_lp

        init = (jnp.int32(0), cache, state, out, out_lp)
        _, cache, state, out, out_lp = jax.lax.while_loop(cond, body, init)
        return cache, state, out, out_lp

    # -- host-facing API ---------------------------------------------------------------------
    def prefill(self, tokens, prompt_lens, state: DecodeState, seq_len: int):
        return self._prefill(self.params, tokens, prompt_lens, state, seq_len=seq_len)

    def decode(self, cache, state: DecodeState, steps: int):
        return self._decode(self.params, cache, state, steps=steps)

    def hidden_states(self, tokens, positions=None):
        """Final hidden states and float32 logits for a full prompt batch [B, T] (tests, scoring)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cache = init_cache(self.cfg, b, t, self.dtype)
        model, hidden, _ = self._forward(self.params, tokens, positions, cache)
        return hidden, model.logits(hidden)
