"""KvCacheConfig: how large the paged KV pool is and how it is cut into blocks."""

from __future__ import annotations

from dataclasses import dataclass

# Without an accelerator there is no free memory to measure: the pool defaults to this many tokens,
# capped at CPU_DEFAULT_MAX_BYTES (set max_tokens to choose).
CPU_DEFAULT_MAX_TOKENS = 32768
CPU_DEFAULT_MAX_BYTES = 1 << 30

# KvCacheConfig.dtype -> the pool's element type ("auto": the model's dtype). "fp8" is
# float8_e4m3fn with a per-layer scale for K and one for V (see jaxllm.runner.paged): one byte a
# value, so the same memory holds twice the tokens of a bfloat16 pool.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class KvCacheConfig:
    """Settings of the paged KV cache.

    free_gpu_memory_fraction: share of the accelerator memory left free after the weights are
        loaded that the pool takes (the rest stays for activations).
    max_tokens: an upper bound on the pool in tokens (on CPU: its size; default 32768 tokens,
        at most 1 GiB).
    tokens_per_block: tokens per KV block (the unit of allocation and of prefix reuse).
    enable_block_reuse: reuse the KV blocks of shared prompt prefixes.
    dtype: "auto" (the model's dtype), "bfloat16" / "float16" / "float32", or "fp8"
        (float8_e4m3fn with per-layer K and V scales, 1.0 unless a checkpoint gives them, as in
        vLLM: half the bytes of bfloat16, so twice the tokens in the same memory).
    """

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    dtype: str = "auto"

    def __post_init__(self):
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {f!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        tpb = self.tokens_per_block
        if isinstance(tpb, bool) or not isinstance(tpb, int) or tpb < 1 or tpb & (tpb - 1):
            raise ValueError(f"tokens_per_block must be a power of two >= 1, got {tpb!r}")
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.dtype!r}")

    def pool_dtype(self, model_dtype):
        """The KV pool's element type for a model computing in model_dtype."""
        import jax.numpy as jnp

        if self.dtype == "auto":
            return jnp.dtype(model_dtype)
        return jnp.dtype(jnp.float8_e4m3fn if self.dtype == "fp8" else self.dtype)
