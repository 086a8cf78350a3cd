"""Environment switches of jaxllm's A/B runs (``JAXLLM_*``), parsed in one place for every layer
(models, kernels, runner, engine)."""

from __future__ import annotations

import os


def env_flag(name: str, default: str = "0") -> bool:
    """An environment switch of values 0 and 1 (`default` when unset); anything else is refused
    naming it."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def env_auto_flag(name: str) -> bool | None:
    """An environment switch of values auto (the default: None, the caller decides), 1 or 0;
    anything else is refused naming it."""
    value = os.environ.get(name, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{name}={value!r}: expected auto, 0 or 1")
    return None if value == "auto" else value == "1"


def env_tiling(name: str, fields: tuple[str, ...]) -> dict | None:
    """A kernel tiling named by an environment switch, ``a/b/c`` positive integers in the order of
    `fields`: {field: value}, or None when unset; anything else is refused naming the switch."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        values = [int(f) for f in value.split("/")]
        if len(values) != len(fields) or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {'/'.join(fields)}, positive integers") from None
    return dict(zip(fields, values))
