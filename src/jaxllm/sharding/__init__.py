"""Mesh construction and logical-axis rules.

Model code names each weight dimension logically ("embed", "heads", "vocab", ...). Only this module
knows how those names map onto mesh axes ("data", "model"), so a new parallel layout is a change of
rules here, never of a model file. Until tensor parallelism lands the mesh has one device and every
rule maps to None (replicated), but every parameter already goes through these rules.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (None: replicated). The tensor-parallel layout will fill these in.
DEFAULT_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "norm": None,
}


def make_mesh(devices=None, model_parallel: int = 1) -> Mesh:
    """A ("data", "model") mesh over the given (default: first `model_parallel`) devices."""
    if devices is None:
        devices = jax.devices()[:model_parallel]
    arr = np.asarray(devices).reshape(1, len(devices))
    return Mesh(arr, ("data", "model"))


def logical_to_spec(axes: tuple[str, ...], mesh: Mesh, rules=None) -> PartitionSpec:
    rules = DEFAULT_RULES if rules is None else rules
    spec = []
    for name in axes:
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        mesh_axis = rules[name]
        spec.append(mesh_axis if mesh_axis is not None and mesh.shape.get(mesh_axis, 1) > 1 else None)
    return PartitionSpec(*spec)


def named_sharding(axes: tuple[str, ...], mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
