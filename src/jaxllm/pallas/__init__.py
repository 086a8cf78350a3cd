"""Pallas GPU attention kernels, each beside its pure-jnp reference (arriving with the kernel issue).

Until then attention runs through the jnp reference in ``jaxllm.runner.kv_cache``.
"""
