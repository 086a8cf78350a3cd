"""Pallas GPU kernels (Mosaic GPU), each beside its pure-jnp reference.

- ``decode_attention``: paged decode attention, used by the runner on NVIDIA GPUs
  (``attention_backend="auto"``); bf16/fp16 pools, and fp8 pools (staged to f16 in the kernel);
  its ``reference_decode_attention`` is the float32 oracle.
- ``prefill_attention``: ragged paged prefill attention (several rows of different query lengths,
  earlier context read from the pages, causal by position); ``reference_prefill_attention`` beside it.

Whole fresh prompts on one GPU go to cuDNN's flash attention (``jax.nn.dot_product_attention``).
Kernels whose GPU suite has not run yet (``runner.runner.UNVERIFIED_ON_GPU``: the prefill kernel,
fp8 decode) serve only an explicit ``attention_backend="pallas"``.
"""
