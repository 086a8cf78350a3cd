"""Requests, the scheduling loop and host-side output handling (detokenization, stop strings)."""

from .engine import Engine, Request

__all__ = ["Engine", "Request"]
