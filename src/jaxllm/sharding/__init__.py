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

import dataclasses
import os

import jax
import jax.numpy as jnp
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
        if name is None:  # an activation's batch / sequence dims: replicated
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        mesh_axis = rules[name]
        size = mesh.shape.get(mesh_axis, 1) if mesh_axis is not None else 1
        divisible = shape is None or shape[i] % size == 0
        spec.append(mesh_axis if size > 1 and divisible else None)
    return PartitionSpec(*spec)


def named_sharding(axes: tuple[str, ...], mesh: Mesh, shape: tuple[int, ...] | None = None, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh, shape, rules))


ROW_PARALLEL_MODES = ("xla", "psum", "oneshot")


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """The collectives of a tensor-parallel step that the runner writes itself (``shard_map``)
    instead of leaving them to XLA's SPMD partitioner. A model reads it from the step's attend
    (``attend.tensor_parallel``); the runner builds it with ``tensor_parallel_for``.

    * ``embed``: the vocabulary-parallel embedding lookup. Each device looks the tokens up in its
      slice of the table (zeros for tokens outside it) and the slices' rows are added: one
      ``[tokens, embed]`` all-reduce. Left to the partitioner, a lookup in a table split over the
      vocabulary became an all-gather of the whole table in every step (1 GiB at Llama-3.1-8B:
      ~1.9 ms of a 7 ms tp=2 decode step on two H100s).
    * ``row_parallel``: the all-reduce after a row-parallel projection (attention's output
      projection, the MLP's down projection: their contracting dim split over "model"). Mode
      "xla" leaves it to the partitioner; "psum" runs the projection per device and adds the
      partial sums with ``lax.psum``; "oneshot", on an axis of 2 GPUs, with the one-shot Mosaic GPU
      kernel of ``pallas.allreduce`` (psum for sizes it does not serve). Same sums each way (two
      partials added once).
    * ``column_parallel``: a projection whose output dim is split (q, k/v, gate/up) -- under any
      mode but "xla" run per device in ``shard_map`` too, so that a kernel XLA cannot partition
      (``pallas.gemv``) sees its shard.

    ``mode`` also picks the lookup's all-reduce (a psum under "xla" and "psum")."""

    mesh: Mesh
    mode: str = "xla"

    def _reduce(self):
        from ..pallas.allreduce import psum2

        return psum2 if self.mode == "oneshot" else jax.lax.psum

    def embed(self, table, table_axes, tokens):
        """table[tokens] for a [vocab, embed] table, tokens of any shape."""
        spec = logical_to_spec(table_axes, self.mesh, table.shape)
        if spec[0] != "model":
            return jnp.take(table, tokens, axis=0)
        reduce = self._reduce()

        def per_device(t, tok):
            local = tok - jax.lax.axis_index("model") * t.shape[0]
            mine = (local >= 0) & (local < t.shape[0])
            rows = jnp.take(t, jnp.where(mine, local, 0), axis=0)
            return reduce(jnp.where(mine[..., None], rows, jnp.zeros((), t.dtype)), "model")

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(spec, PartitionSpec()),
                             out_specs=PartitionSpec(), check_vma=False)(table, tokens)

    def replicated(self, f, *args):
        """f(*args) on every device for replicated arrays (a kernel XLA's partitioner cannot place:
        pallas.add_norm's residual add + RMSNorm), its results replicated."""
        return jax.shard_map(f, mesh=self.mesh, in_specs=(PartitionSpec(),) * len(args), out_specs=PartitionSpec(),
                             check_vma=False)(*args)

    def column_parallel(self, f, x, x_axes, w, w_axes, scale=None):
        """f(x, w, scale), a projection whose output dims (w's axes not in x_axes, in w's order) may
        be split over "model": per device in shard_map unless the mode is "xla"; x replicated."""
        if self.mode == "xla":
            return f(x, w, scale)
        out_axes = tuple(a for a in w_axes if a not in x_axes)
        w_spec = logical_to_spec(w_axes, self.mesh, w.shape)
        out_shape = tuple(n for n, a in zip(w.shape, w_axes) if a not in x_axes)
        out_spec = logical_to_spec(out_axes, self.mesh, out_shape)
        batch = x.ndim - sum(a in x_axes for a in w_axes)
        args, specs = (x, w), (PartitionSpec(), w_spec)
        if scale is not None:  # per output channel
            args, specs = args + (scale,), specs + (out_spec,)
        return jax.shard_map(lambda x, w, *s: f(x, w, s[0] if s else None), mesh=self.mesh, in_specs=specs,
                             out_specs=PartitionSpec(*((None,) * batch + tuple(out_spec))), check_vma=False)(*args)

    def row_parallel(self, f, x, x_axes, w, w_axes, scale=None, keep_float32: bool = False):
        """f(x, w, scale), a projection contracting the logical axes x and w share (x_axes may name
        batch dims None), with its partial sums over "model" added; x's other dims and w's output
        dims come out replicated. Outside "xla" mode f is called with out_dtype=float32: the partials
        are added in float32 and rounded to x's dtype once, as tp=1's single product is (so tp=2's
        bfloat16 logits equal tp=1's on CPU; rounding each partial first moved them). `keep_float32`:
        return the float32 sum unrounded (a fused residual add that rounds it itself,
        pallas.add_norm: no convert kernel after the all-reduce)."""
        if self.mode == "xla":
            return f(x, w, scale)
        x_spec, w_spec = logical_to_spec(x_axes, self.mesh, x.shape), logical_to_spec(w_axes, self.mesh, w.shape)
        if not any(s == "model" and a in x_axes for a, s in zip(w_axes, w_spec)):
            return f(x, w, scale)  # the contracting dim is whole on every device: nothing to add
        reduce = self._reduce()

        def per_device(x, w, *scale):  # partial sums added in float32, rounded once (as at tp=1)
            y = reduce(f(x, w, scale[0] if scale else None, out_dtype=jnp.float32), "model")
            return y if keep_float32 else y.astype(x.dtype)

        args, specs = (x, w), (x_spec, w_spec)
        if scale is not None:  # per output channel: replicated
            args, specs = args + (scale,), specs + (PartitionSpec(),)
        return jax.shard_map(per_device, mesh=self.mesh, in_specs=specs, out_specs=PartitionSpec(),
                             check_vma=False)(*args)


def row_parallel_mode(mesh: Mesh | None = None) -> str:
    """The environment switch JAXLLM_ROW_PARALLEL: "xla", "psum", "oneshot" (see TensorParallel) or
    "auto", the default, which on a mesh of GPUs is "psum" and elsewhere "xla". On GPUs the
    projections per device let each shard's q, k/v and output projection run through pallas.gemv:
    tp=2 at batch 1 4.79 -> 4.34 ms on 2x H200 (BENCHMARKS.md "Eighth session"), and its greedy
    tokens on random Llama-3.1-8B weights are no farther from exact (float32) arithmetic than tp=1's
    or the partitioner's ("Ninth session"). With a mesh, "auto" is resolved for it."""
    mode = os.environ.get("JAXLLM_ROW_PARALLEL", "auto")
    if mode == "auto" and mesh is not None:
        return "psum" if mesh.devices.flat[0].platform == "gpu" else "xla"
    return mode


def tensor_parallel_for(mesh: Mesh, mode: str | None = None) -> TensorParallel | None:
    """The TensorParallel of a model on this mesh (None on one device). mode: one of
    ROW_PARALLEL_MODES, default from the environment switch ``JAXLLM_ROW_PARALLEL``
    (row_parallel_mode: "psum" on GPUs, "xla" elsewhere); "oneshot" needs a "model" axis of 2 GPUs
    of one process."""
    mode = mode or row_parallel_mode(mesh)
    if mode not in ROW_PARALLEL_MODES:
        raise ValueError(f"JAXLLM_ROW_PARALLEL must be one of {ROW_PARALLEL_MODES + ('auto',)}, got {mode!r}")
    tp = tensor_parallel_size(mesh)
    if tp == 1:
        return None
    platform = mesh.devices.flat[0].platform
    if mode == "oneshot" and (tp != 2 or platform != "gpu" or jax.process_count() > 1):
        raise ValueError(f"JAXLLM_ROW_PARALLEL=oneshot needs tensor_parallel_size=2 on the GPUs of one process, "
                         f"got {tp} on {platform} ({jax.process_count()} processes)")
    return TensorParallel(mesh, mode)
