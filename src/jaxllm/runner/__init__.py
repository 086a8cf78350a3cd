"""Turns a scheduled batch into padded device arrays; owns the jitted prefill / decode functions."""

from .runner import DecodeState, ModelRunner, bucket

__all__ = ["DecodeState", "ModelRunner", "bucket"]
