"""Requests, the scheduler (continuous batching, chunked prefill, preemption), KV block manager,
and the engine thread that runs them."""

from .engine import Engine, EngineDeadError
from .request import GroupHandle, Request, RequestHandle

__all__ = ["Engine", "EngineDeadError", "GroupHandle", "Request", "RequestHandle"]
