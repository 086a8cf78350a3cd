"""On-device sampling: greedy, temperature, top-k, top-p, min-p; per-row settings, per-row seeds.

Every row of a batch carries its own settings as arrays, so one compiled function serves any mix of
greedy and sampled requests. A row's random key is its seed folded with the position of the token
being chosen: a seeded request draws the same numbers whatever else shares the batch and however
many device steps it is split into.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclass
class SamplingArrays:
    """Per-row sampling settings, [B] each (keys: [B, 2] uint32 raw PRNG keys)."""

    greedy: jax.Array
    temperature: jax.Array
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1 = off
    min_p: jax.Array  # 0 = off
    keys: jax.Array

    @classmethod
    def from_requests(cls, params: list, key_data: list[np.ndarray], rows: int, on_host: bool = False) -> "SamplingArrays":
        """Arrays for SamplingParams `params` (with their rows' raw keys), padded to `rows` (greedy).
        `on_host`: numpy arrays, for a caller that moves a whole call's inputs to the devices at once."""
        n = len(params)
        greedy = np.ones((rows,), np.bool_)
        temperature = np.ones((rows,), np.float32)
        top_k = np.zeros((rows,), np.int32)
        top_p = np.ones((rows,), np.float32)
        min_p = np.zeros((rows,), np.float32)
        keys = np.zeros((rows, 2), np.uint32)
        for i, p in enumerate(params):
            greedy[i] = p.is_greedy
            temperature[i] = 1.0 if p.temperature is None else p.temperature
            top_k[i] = p.top_k or 0
            top_p[i] = 1.0 if p.top_p is None else p.top_p
            min_p[i] = p.min_p or 0.0
        if n:
            keys[:n] = np.stack(key_data)
        arrays = (greedy, temperature, top_k, top_p, min_p, keys)
        return cls(*(arrays if on_host else map(jnp.asarray, arrays)))


def key_data_for_seed(seed: int) -> np.ndarray:
    """The raw PRNG key a request with this seed samples with: ``jax.random.PRNGKey(seed)``'s.

    With JAX's default key (threefry2x32, 64-bit types off) that key is ``[0, seed mod 2**32]``,
    made here on the host: through JAX it is a device program whose result the caller waits for,
    and on a GPU that wait queues behind whatever step the engine is running (a whole decode call
    added to a request submitted meanwhile). Other configurations ask JAX, on the host (_on_host)."""
    if 0 <= seed < 2**63 and not jax.config.jax_enable_x64 and jax.config.jax_default_prng_impl == "threefry2x32":
        return np.array([0, seed % 2**32], np.uint32)
    with _on_host():
        return np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32)


def fold_key_data(key_data: np.ndarray, i: int) -> np.ndarray:
    """The raw key of a request's sequence i (of n / best_of): its key folded with i (on the host)."""
    with _on_host():
        key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(key_data)), i)
        return np.asarray(jax.random.key_data(key), np.uint32)


def _on_host():
    """A context that runs JAX work on the CPU backend where there is one: a request's keys are made
    when it is submitted, and a program on the GPU would wait behind the engine's running step."""
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): the default device
        return contextlib.nullcontext()


def _filtered_sample(logits, s: SamplingArrays, positions):
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
    sorted_logits, sorted_idx = jax.lax.top_k(scaled, vocab)  # descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, vocab)[:, None]
    masked = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token is always kept)
    before = jnp.cumsum(probs, axis=-1) - probs
    masked = jnp.where(before < s.top_p[:, None], masked, -jnp.inf)
    # min-p: drop tokens below min_p times the most likely token's probability
    masked = jnp.where(probs >= s.min_p[:, None] * probs[:, :1], masked, -jnp.inf)
    keys = jax.vmap(lambda k, p: jax.random.fold_in(jax.random.wrap_key_data(k), p))(s.keys, positions)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    return jnp.take_along_axis(sorted_idx, choice[:, None], axis=-1)[:, 0]


def sample(logits, s: SamplingArrays, positions, all_greedy: bool = False):
    """Choose one token per row from float32 logits [B, V].

    positions: [B] int32, the position the chosen token will occupy (folded into the row's key).
    all_greedy (static): every row is greedy, so the sorting sampler is left out of the program.
    It is a trace-time flag, not a ``lax.cond``: XLA:GPU reads a cond's predicate on the host,
    which would stall the device once per decode step.
    Returns (tokens [B] int32, log_softmax of the logits [B, V] float32).
    """
    logits = logits.astype(jnp.float32)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not all_greedy:
        tokens = jnp.where(s.greedy, tokens, _filtered_sample(logits, s, positions).astype(jnp.int32))
    return tokens, jax.nn.log_softmax(logits, axis=-1)


def forbid_stops_before_min(logits, stop_ids, num_generated, min_tokens):
    """logits [B, V] with each row's stop_ids [B, K] (ids >= V: padding) at -inf while the row has
    made fewer than its min_tokens: before min_tokens, tokens that would end the row are not allowed."""
    rows = jnp.arange(logits.shape[0])[:, None]
    block = (num_generated < min_tokens)[:, None]
    return logits.at[rows, jnp.where(block, stop_ids, logits.shape[-1])].set(-jnp.inf, mode="drop")


def advance_rows(tok, stop_ids, tokens, positions, num_generated, max_tokens, done):
    """A decode step's row bookkeeping after each row's new token `tok` [B]: (tokens out (-1 for rows
    already done), tokens, positions, num_generated, done). A row is done once it makes one of its
    stop_ids [B, K] or its max_tokens-th token."""
    active = ~done
    num = num_generated + active.astype(jnp.int32)
    hit_stop = jnp.any(tok[:, None] == stop_ids, axis=-1)
    new_done = done | (active & (hit_stop | (num >= max_tokens)))
    return (jnp.where(active, tok, -1), jnp.where(active, tok, tokens), jnp.where(active, positions + 1, positions),
            num, new_done)


def token_info(logprobs, tokens, num_logprobs: int | None) -> dict:
    """What the host gets about each chosen token: its logprob, and with num_logprobs (static) its
    rank (1 = most likely) and the num_logprobs most likely tokens with their logprobs."""
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    info = {"logprob": chosen}
    if num_logprobs is not None:
        info["rank"] = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1).astype(jnp.int32)
        top_lps, top_ids = jax.lax.top_k(logprobs, max(num_logprobs, 1))
        info["top_ids"], info["top_lps"] = top_ids.astype(jnp.int32), top_lps
    return info


@jax.tree_util.register_dataclass
@dataclass
class BadWordsState:
    """Tokens a row may never produce: single tokens always, the last token of a multi-token bad
    word when the row's latest tokens spell the rest of it (vLLM's bad_words semantics).

    banned [B, K] (padding: vocab); prefixes [B, M, L-1] right-aligned (WILDCARD where a shorter
    word has nothing); lasts [B, M] (padding: vocab); history [B, L-1]: the row's latest tokens.
    """

    banned: jax.Array
    prefixes: jax.Array
    lasts: jax.Array
    history: jax.Array

    WILDCARD = -2

    def apply(self, logits):
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, self.banned].set(-jnp.inf, mode="drop")
        hit = jnp.all((self.prefixes == self.WILDCARD) | (self.prefixes == self.history[:, None, :]), axis=-1)
        return logits.at[rows, jnp.where(hit, self.lasts, logits.shape[-1])].set(-jnp.inf, mode="drop")

    def update(self, tokens, active):
        if self.history.shape[1] == 0:
            return self
        shifted = jnp.concatenate([self.history[:, 1:], tokens[:, None]], axis=1)
        return dataclasses.replace(self, history=jnp.where(active[:, None], shifted, self.history))


@jax.tree_util.register_dataclass
@dataclass
class PenaltyState:
    """Per-row penalty settings [B] and token statistics [B, V], kept up to date inside the loop."""

    repetition: jax.Array
    presence: jax.Array
    frequency: jax.Array
    seen: jax.Array  # bool [B, V]: in the prompt or the output
    counts: jax.Array  # int32 [B, V]: occurrences in the output

    @classmethod
    def build(cls, vocab: int, prompt_ids, output_ids, repetition, presence, frequency) -> "PenaltyState":
        """From padded id arrays [B, L] (padding: vocab, dropped) — traced, so no [B, V] transfer."""
        rows = jnp.arange(prompt_ids.shape[0])[:, None]
        b = prompt_ids.shape[0]
        counts = jnp.zeros((b, vocab), jnp.int32).at[rows, output_ids].add(1, mode="drop")
        seen = jnp.zeros((b, vocab), jnp.bool_).at[rows, prompt_ids].set(True, mode="drop") | (counts > 0)
        return cls(repetition, presence, frequency, seen, counts)

    def apply(self, logits):
        rep = self.repetition[:, None]
        penalized = jnp.where(logits > 0, logits / rep, logits * rep)
        logits = jnp.where(self.seen, penalized, logits)
        return logits - self.presence[:, None] * (self.counts > 0) - self.frequency[:, None] * self.counts

    def update(self, tokens, active):
        rows = jnp.arange(tokens.shape[0])
        add = active.astype(jnp.int32)
        counts = self.counts.at[rows, tokens].add(add, mode="drop")
        seen = self.seen.at[rows, tokens].set(self.seen[rows, tokens] | active, mode="drop")
        return dataclasses.replace(self, counts=counts, seen=seen)
