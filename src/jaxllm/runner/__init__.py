"""Turns a scheduled batch into padded device arrays; owns the jitted prefill / decode and the KV pool."""

from .paged import ATTENTION_BACKENDS, device_memory, plan_num_blocks, pool_bytes_per_token
from .runner import ModelRunner, RowState, bucket

__all__ = ["ATTENTION_BACKENDS", "ModelRunner", "RowState", "bucket", "device_memory", "plan_num_blocks", "pool_bytes_per_token"]
