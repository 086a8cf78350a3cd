"""Pallas GPU kernels (Mosaic GPU), each beside its pure-jnp reference.

- ``decode_attention``: paged decode attention, used by the runner on NVIDIA GPUs
  (``attention_backend="auto"``); bf16/fp16 pools, and fp8 pools (staged to f16 in the kernel);
  its ``reference_decode_attention`` is the float32 oracle.
- ``prefill_attention``: ragged paged prefill attention (several rows of different query lengths,
  earlier context read from the pages, causal by position); ``reference_prefill_attention`` beside it.

Whole fresh prompts on one GPU go to cuDNN's flash attention (``jax.nn.dot_product_attention``):
on an H100 it beats the prefill kernel there (2k tokens: 115 vs 121 us with its K/V gather), while
the kernel wins chunked and mixed batches (512-token chunk over 2k context: 103 vs 159 us; 8 ragged
rows: 394 vs 1094 us) — BENCHMARKS.md, "Ragged prefill kernel".
"""
