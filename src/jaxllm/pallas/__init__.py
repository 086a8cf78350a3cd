"""Pallas GPU kernels, each beside its pure-jnp reference.

- ``decode_attention``: paged decode attention (Mosaic GPU), used by the runner on NVIDIA GPUs
  (``attention_backend="auto"``); its ``reference_decode_attention`` is the float32 oracle.

Prefill attention runs through ``jaxllm.runner.paged`` (the jnp gather reference, or cuDNN's flash
attention for whole prompts on GPUs); a ragged paged prefill kernel is still to come.
"""
