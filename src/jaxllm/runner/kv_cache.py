"""The KV cache and the attention that reads it, behind the ``attend`` interface models call.

This is the contiguous cache of the static-batch runner: one ``[B, S, kv_heads, head_dim]`` buffer
for K and one for V per layer, row b holding sequence b from position 0. The engine's paged pool
replaces it behind the same interface: ``make_attend(meta)`` returns the function a model calls as
``attend(layer, q, k, v, cache) -> (out, cache)``; the model never sees the layout.

The attention here is the pure-jnp reference (scores in float32): it runs on CPU and GPU alike;
Pallas kernels plug in behind the same interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..models import ModelConfig


def init_cache(cfg: ModelConfig, batch: int, seq_len: int, dtype):
    shape = (batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def reference_attention(q, k_cache, v_cache, q_positions, sliding_window: int | None):
    """q [B, T, H, D] at q_positions [B, T] over the cache [B, S, Hkv, D]; causal by position.

    A query at position p sees cache positions 0..p (and, with a sliding window w, only p-w < pos).
    """
    b, t, h, d = q.shape
    kvh = k_cache.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / d**0.5)
    kv_pos = jnp.arange(k_cache.shape[1])
    mask = kv_pos[None, None, :] <= q_positions[:, :, None]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d)


def make_attend(positions, sliding_window: int | None = None):
    """The attend function for tokens at `positions` [B, T]: write their K/V, then attend.

    Positions past the end of the cache (padding) are dropped by the scatter, never written.
    """
    rows = jnp.arange(positions.shape[0])[:, None]

    def attend(layer, q, k, v, cache):
        k_cache, v_cache = cache[layer]
        k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
        out = reference_attention(q, k_cache, v_cache, positions, sliding_window)
        cache = list(cache)
        cache[layer] = (k_cache, v_cache)
        return out, cache

    return attend
