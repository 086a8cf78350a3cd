"""Read checkpoint tensors and place them, shard by shard, as the model's parameters.

Sources yield ``(hf_name, LazyTensor)``: safetensors (single file or sharded through
``model.safetensors.index.json``) read any rectangular slice straight from the file; GGUF tensors
are dequantized whole by the ``gguf`` package, one at a time. ``place_weights`` runs a model's
declarative weight map over any source (it knows no model) and builds each parameter with
``jax.make_array_from_callback``: every device's shard is read as the one HF slice it needs, so a
host reads only what its devices hold and no full copy of a split tensor is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.config import ModelConfig
from ..models.weight_map import WeightMap
from ..sharding import named_sharding


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {folder}; only safetensors and GGUF are loaded "
            "(pickled .bin/.pt checkpoints are refused for safety)"
        )
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing shard files: {missing}")
    return files


@dataclass
class LazyTensor:
    """A checkpoint tensor not read yet: its shape, and read(index) for a slice (None: all of it)."""

    shape: tuple[int, ...]
    read: Callable[[tuple[slice, ...] | None], np.ndarray]


def iter_safetensors(folder: Path) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    # framework="flax" understands bfloat16 (numpy alone does not); keep the tensor on the host.
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own (multi-host: devices()[0] may be remote)
    for f in safetensors_files(folder):
        with jax.default_device(cpu), safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                sl = st.get_slice(name)

                def read(index, sl=sl):
                    with jax.default_device(cpu):
                        return np.asarray(sl[index if index is not None else ...])

                yield name, LazyTensor(tuple(sl.get_shape()), read)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rope permutation of q/k rows (as transformers' GGUF loader does)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_gguf(path: Path, cfg: ModelConfig, weight_map: WeightMap, gguf_arch: str) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, cfg.num_layers)
    to_hf = {}
    for hf_name in weight_map.hf_names(cfg):
        base, _, suffix = hf_name.rpartition(".")
        g = name_map.get_name(base)
        if g is not None:
            to_hf[f"{g}.{suffix}"] = hf_name
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name not in to_hf:
            raise ValueError(f"GGUF tensor {t.name!r} in {path.name} is not known for this architecture")
        w = gguf.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = _unpermute_rope(w, cfg.num_heads)
        elif ".attn_k." in t.name:
            w = _unpermute_rope(w, cfg.num_kv_heads)
        yield to_hf[t.name], LazyTensor(w.shape, lambda index, w=w: w if index is None else w[index])


def place_weights(abstract_state: nnx.State, tensors, cfg: ModelConfig, weight_map: WeightMap, mesh) -> nnx.State:
    """Fill an abstract model state from (hf_name, LazyTensor) pairs, shard by shard on the mesh."""
    flat = dict(nnx.to_flat_state(abstract_state))
    by_dotted = {".".join(map(str, path)): path for path in flat}
    filled: set[str] = set()
    for hf_name, tensor in tensors:
        try:
            m = weight_map.match(hf_name)
        except KeyError:
            raise ValueError(f"checkpoint tensor {hf_name!r} is not part of {cfg.architecture}") from None
        if m is None:
            continue
        dotted, layout = m
        if dotted not in by_dotted:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} maps to {dotted!r}, which this config does not have"
            )
        var = flat[by_dotted[dotted]]
        target = var.get_value()
        shape = tuple(target.shape)
        if layout.param_shape(tensor.shape, cfg) != shape:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tensor.shape}; expected {shape} "
                f"after layout conversion (config mismatch?)"
            )
        sharding = named_sharding(var.get_metadata()["axes"], mesh, shape)
        shard = partial(_read_shard, tensor=tensor, layout=layout, cfg=cfg, shape=shape, dtype=target.dtype)
        var.set_value(jax.make_array_from_callback(shape, sharding, shard))
        filled.add(dotted)
    missing = sorted(set(by_dotted) - filled)
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return nnx.from_flat_state(flat)


def _read_shard(index, *, tensor: LazyTensor, layout, cfg, shape, dtype) -> np.ndarray:
    """The shard param[index] of one parameter, read as the HF slice that holds it."""
    index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
    hf_index = layout.hf_index(index, cfg)
    if hf_index is None:  # not one rectangular HF slice: read the whole tensor
        return np.asarray(layout(tensor.read(None), cfg))[index].astype(dtype)
    heads = None
    if layout.split_axis is not None:
        heads = index[layout.split_axis].stop - index[layout.split_axis].start
    return np.asarray(layout.to_param(tensor.read(hf_index), cfg, heads)).astype(dtype)


@partial(jax.jit, static_argnames=("shape", "dtype", "init", "sharding"))
def _random_param(key, shape, dtype, init, sharding):
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.lax.with_sharding_constraint(value, sharding)


def random_weights(abstract_state: nnx.State, mesh, seed: int = 0) -> nnx.State:
    """Random parameters of the right shapes, made on the devices one by one (load_format="dummy").

    One small jitted function per distinct shape: compiling the whole model's initialisation as one
    program takes minutes on a GPU for an 8B model, this takes seconds.
    """
    flat = nnx.to_flat_state(abstract_state)
    key = jax.random.PRNGKey(seed)
    for i, (_, var) in enumerate(flat):
        meta = var.get_metadata()
        target = var.get_value()
        sharding = named_sharding(meta["axes"], mesh, tuple(target.shape))
        value = _random_param(jax.random.fold_in(key, i), tuple(target.shape), target.dtype, meta.get("init", "normal"), sharding)
        var.set_value(value)
    return nnx.from_flat_state(flat)
