"""Mesh construction and logical-axis rules.

Model code names each weight dimension logically ("embed", "heads", "vocab", ...). Only this module
knows how those names map onto mesh axes ("data", "model"), so a new parallel layout is a change of
rules here, never of a model file.

Tensor parallelism is Megatron-style and left to XLA's SPMD partitioner: attention heads, KV heads,
the MLP's inner dimension and the vocabulary are split over "model"; XLA inserts the collectives
that the shardings imply. A dimension that does not divide evenly over its mesh axis (say 2 KV
heads on 4 devices) is replicated instead: the KV-head replication of tensor-parallel inference.
The KV cache then stores one copy of each KV head per device that reads it (``runner.paged.pool_kv_heads``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "norm": None,
    "kv_slots": None,
    "stack": None,  # fused projections' parts (k | v, gate | up): each shard holds all of them
}


def tensor_parallel_size(mesh: Mesh) -> int:
    """How many devices the model is split over on this mesh (its "model" axis)."""
    return mesh.shape.get("model", 1)


def make_mesh(devices) -> Mesh:
    """A ("data", "model") mesh of 1 x len(devices): one model replica, tensor parallel over devices."""
    return Mesh(np.asarray(devices).reshape(1, len(devices)), ("data", "model"))


def make_meshes(tensor_parallel: int = 1, data_parallel: int = 1) -> list[Mesh]:
    """One mesh per data-parallel replica, each over its own tensor_parallel local devices."""
    available = jax.devices()
    if tensor_parallel * data_parallel > len(available):
        raise ValueError(
            f"tensor_parallel_size * data_parallel_size must be <= the number of devices ({len(available)}), "
            f"got {tensor_parallel} * {data_parallel}"
        )
    return [make_mesh(available[i * tensor_parallel : (i + 1) * tensor_parallel]) for i in range(data_parallel)]


def replicate_on(module, mesh: Mesh):
    """A copy of an NNX module whose parameters sit on `mesh` with the same partitioning."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec)), state)
    return nnx.merge(graphdef, state)


def logical_to_spec(axes: tuple[str, ...], mesh: Mesh, shape: tuple[int, ...] | None = None, rules=None) -> PartitionSpec:
    """The PartitionSpec of a tensor with these logical axes (and, if given, this shape) on mesh."""
    rules = DEFAULT_RULES if rules is None else rules
    spec = []
    for i, name in enumerate(axes):
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        mesh_axis = rules[name]
        size = mesh.shape.get(mesh_axis, 1) if mesh_axis is not None else 1
        divisible = shape is None or shape[i] % size == 0
        spec.append(mesh_axis if size > 1 and divisible else None)
    return PartitionSpec(*spec)


def named_sharding(axes: tuple[str, ...], mesh: Mesh, shape: tuple[int, ...] | None = None, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules))

