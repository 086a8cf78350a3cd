"""Read checkpoint tensors and place them, shard by shard, as the model's parameters.

Sources yield ``(hf_name, LazyTensor)``: safetensors (single file or sharded through
``model.safetensors.index.json``) read any rectangular slice straight from the file; GGUF tensors
are dequantized whole by the ``gguf`` package, one at a time. ``place_weights`` runs a model's
declarative weight map over any source (it knows no model) and builds each parameter with
``jax.make_array_from_callback``: every device's shard is read as the one HF slice it needs, so a
host reads only what its devices hold and no full copy of a split tensor is made. A fused
parameter (k | v, gate | up: ``Rule.part``) is placed once all its HF tensors have been seen, each
shard stacked from the parts' slices.

Quantized projections (``models/quant.py``): a checkpoint tensor already in float8_e4m3fn or int8
(a pre-quantized checkpoint) is placed as it is, its scale by its own weight-map rule; a
full-precision tensor bound for a quantized parameter is placed in float32 and quantized on the
devices right away (one jitted call per parameter, keeping its sharding), then dropped.
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
from ..models.quant import WEIGHT_DTYPES, is_k_minor, quantize_weight
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
    dtype: object = None  # the stored dtype (numpy / ml_dtypes), where the source says
    parts: tuple = ()  # a fused parameter's tensors (see _StackLayout); read is None then


def dequantizing(tensors, is_piece, build, need, label, drop=(), hint=""):
    """Pass (name, LazyTensor) pairs through, except those whose name's last part is in `drop` and a
    quantized projection's pieces -- those whose name's last part `suffix` has is_piece(suffix,
    tensor) -- gathered by the projection's name (from any file, in any order); then yield one
    ``<prefix>.weight`` per projection, build(prefix, {suffix: tensor}) (a float LazyTensor that
    dequantizes what it is asked to read), once the pieces in `need` are all there (else a
    ValueError naming the projection, what it has and what it lacks: "`label` checkpoint: ...",
    `hint` after). For the checkpoints dequantized as they are read (loader/fp4.py,
    loader/int_packed.py)."""
    pending: dict[str, dict[str, LazyTensor]] = {}
    for name, tensor in tensors:
        prefix, _, suffix = name.rpartition(".")
        if suffix in drop:
            continue
        if is_piece(suffix, tensor):
            pending.setdefault(prefix, {})[suffix] = tensor
        else:
            yield name, tensor
    for prefix, parts in pending.items():
        missing = [p for p in need if p not in parts]
        if missing:
            raise ValueError(f"{label} checkpoint: {prefix!r} has {sorted(parts)} but not {missing}{hint}")
        yield prefix + ".weight", build(prefix, parts)


# safetensors' own numpy and flax readers cannot return float8 tensors (they look the dtype up on
# numpy itself); those are read through a read-only memory map of the file (the layout is
# documented: an 8-byte little-endian header size, a JSON header of dtype / shape / data_offsets
# per tensor, then the data), which reads only the slice asked for.
_MEMMAP_DTYPES = {"F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}
_DTYPES = {"BF16": jnp.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
           "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_, **_MEMMAP_DTYPES}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _memmap_reader(path: Path, entry: dict, data_start: int):
    dtype = np.dtype(_MEMMAP_DTYPES[entry["dtype"]])
    shape = tuple(entry["shape"])

    def read(index):
        arr = np.memmap(path, dtype=dtype, mode="r", offset=data_start + entry["data_offsets"][0],
                        shape=shape if shape else (1,))
        arr = arr if shape else arr.reshape(())
        return np.array(arr[index if index is not None else ...])

    return read


def iter_safetensors(folder: Path) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    # framework="flax" understands bfloat16 (numpy alone does not); keep the tensor on the host.
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own (multi-host: devices()[0] may be remote)
    for f in safetensors_files(folder):
        header, data_start = _safetensors_header(f)
        with jax.default_device(cpu), safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                entry = header[name]
                if entry["dtype"] in _MEMMAP_DTYPES:
                    read = _memmap_reader(f, entry, data_start)
                else:
                    sl = st.get_slice(name)

                    def read(index, sl=sl):
                        with jax.default_device(cpu):
                            return np.asarray(sl[index if index is not None else ...])

                yield name, LazyTensor(tuple(entry["shape"]), read, _DTYPES.get(entry["dtype"]))


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
        yield to_hf[t.name], LazyTensor(w.shape, lambda index, w=w: w if index is None else w[index], w.dtype)


_QUANTIZED = {jnp.dtype(d): name for name, d in WEIGHT_DTYPES.items()}
# what a pre-quantized checkpoint's projection weight may be stored in, placed as it is
_STORED_8BIT = tuple(jnp.dtype(d) for d in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8))


def _quantization_of(flat_by_dotted: dict, dotted: str) -> str | None:
    """"fp8" / "int8" for a quantized projection weight (an 8-bit param with a _scale beside it)."""
    var = flat_by_dotted[dotted]
    mode = _QUANTIZED.get(jnp.dtype(var.get_value().dtype))
    return mode if mode is not None and dotted + "_scale" in flat_by_dotted else None


@partial(jax.jit, static_argnames=("quantization", "axes", "out_axes", "shardings"))
def _quantize_param(w, quantization, axes, out_axes, shardings):
    q, scale = quantize_weight(w, quantization, axes, out_axes)
    return jax.lax.with_sharding_constraint(q, shardings[0]), jax.lax.with_sharding_constraint(scale, shardings[1])


def _set_quantized(flat_by_dotted: dict, dotted: str, full, mesh) -> None:
    """Quantize a placed full-precision weight into its (weight, scale) params, on the devices."""
    var, svar = flat_by_dotted[dotted], flat_by_dotted[dotted + "_scale"]
    axes, out_axes = tuple(var.get_metadata()["axes"]), tuple(svar.get_metadata()["axes"])
    shardings = (named_sharding(axes, mesh, tuple(full.shape)),
                 named_sharding(out_axes, mesh, tuple(svar.get_value().shape)))
    q, scale = _quantize_param(full, _quantization_of(flat_by_dotted, dotted), axes, out_axes, shardings)
    full.delete()
    var.set_value(q)
    svar.set_value(scale)


def place_weights(abstract_state: nnx.State, tensors, cfg: ModelConfig, weight_map: WeightMap, mesh) -> nnx.State:
    """Fill an abstract model state from (hf_name, LazyTensor) pairs, shard by shard on the mesh."""
    flat = dict(nnx.to_flat_state(abstract_state))
    by_dotted = {".".join(map(str, path)): path for path in flat}
    vars_by_dotted = {d: flat[p] for d, p in by_dotted.items()}
    filled: dict[str, str] = {}  # param -> the checkpoint tensor it came from

    def fill(dotted, hf_name):
        if dotted in filled:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} sets {dotted!r}, already set from {filled[dotted]!r} "
                "(a weight_scale beside a weight that is not stored in float8_e4m3fn?)"
            )
        filled[dotted] = hf_name

    parts_of: dict[str, dict[int, tuple[str, LazyTensor, object]]] = {}  # fused params being gathered
    for hf_name, tensor in tensors:
        try:
            m = weight_map.match(hf_name)
        except KeyError:
            raise ValueError(f"checkpoint tensor {hf_name!r} is not part of {cfg.architecture}") from None
        if m is None:
            continue
        dotted, layout, part = m
        if dotted not in by_dotted:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} maps to {dotted!r}, which this config does not have"
            )
        var = flat[by_dotted[dotted]]
        quantization = _quantization_of(vars_by_dotted, dotted)
        if is_k_minor(quantization):  # an fp8 weight, stored [out..., in...]
            layout = layout.k_minor()
        if part is not None:  # one part of a fused parameter: placed once all its parts are here
            axis = list(var.get_metadata()["axes"]).index("stack")
            parts = parts_of.setdefault(dotted, {})
            if part in parts:
                raise ValueError(f"checkpoint tensors {parts[part][0]!r} and {hf_name!r} both set part {part} of {dotted!r}")
            parts[part] = (hf_name, tensor, layout)
            if len(parts) < var.get_value().shape[axis]:
                continue
            del parts_of[dotted]
            group = [parts[i] for i in range(len(parts))]
            hf_name = " + ".join(n for n, _, _ in group)
            dtypes = {None if t.dtype is None else jnp.dtype(t.dtype) for _, t, _ in group}
            tensor = LazyTensor(tuple(t.shape for _, t, _ in group), None, dtypes.pop() if len(dtypes) == 1 else None,
                                parts=tuple(t for _, t, _ in group))
            layout = _StackLayout(tuple(lay for _, _, lay in group), axis)
        target = var.get_value()
        shape = tuple(target.shape)
        if layout.param_shape(tensor.shape, cfg) != shape:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tensor.shape}; expected {shape} "
                f"after layout conversion (config mismatch?)"
            )
        sharding = named_sharding(var.get_metadata()["axes"], mesh, shape)
        stored_8bit = tensor.dtype is not None and jnp.dtype(tensor.dtype) in _STORED_8BIT
        if stored_8bit and (quantization is None or jnp.dtype(tensor.dtype) != jnp.dtype(target.dtype)):
            raise ValueError(
                f"checkpoint tensor {hf_name!r} is stored in {jnp.dtype(tensor.dtype).name}, but {dotted!r} is "
                f"{'not a quantized projection' if quantization is None else 'a ' + quantization + ' weight'}: jaxllm "
                "loads float8_e4m3fn (FP8 checkpoints) and int8 (int8 checkpoints) weights of the attention and MLP "
                "projections only (embeddings, lm_head and norms stay unquantized)"
            )
        if quantization is not None and not stored_8bit:  # full precision -> quantize on the devices
            shard = partial(_read_shard, tensor=tensor, layout=layout, cfg=cfg, shape=shape, dtype=np.float32)
            fill(dotted, hf_name)
            fill(dotted + "_scale", hf_name)
            _set_quantized(vars_by_dotted, dotted, jax.make_array_from_callback(shape, sharding, shard), mesh)
            continue
        shard = partial(_read_shard, tensor=tensor, layout=layout, cfg=cfg, shape=shape, dtype=target.dtype)
        var.set_value(jax.make_array_from_callback(shape, sharding, shard))
        fill(dotted, hf_name)
    for dotted, parts in parts_of.items():
        raise ValueError(
            f"checkpoint has only part(s) {sorted(parts)} of the fused parameter {dotted!r} "
            f"({', '.join(n for n, _, _ in parts.values())}); its other part(s) are missing"
        )
    missing = sorted(set(by_dotted) - set(filled))
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return nnx.from_flat_state(flat)


@dataclass(frozen=True)
class _StackLayout:
    """A fused parameter (``Rule.part``): its parts' layouts, stacked along axis `axis`. Its tensor
    is a LazyTensor whose shape is the tuple of the parts' shapes and whose `parts` are theirs."""

    parts: tuple
    axis: int

    def param_shape(self, hf_shapes, cfg) -> tuple[int, ...] | None:
        shapes = {lay.param_shape(s, cfg) for lay, s in zip(self.parts, hf_shapes)}
        if len(shapes) != 1 or None in shapes:
            return None
        sub = shapes.pop()
        return sub[: self.axis] + (len(self.parts),) + sub[self.axis :]


def _read_shard(index, *, tensor: LazyTensor, layout, cfg, shape, dtype) -> np.ndarray:
    """The shard param[index] of one parameter, read as the HF slice that holds it."""
    index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
    if isinstance(layout, _StackLayout):  # each part's slice, read as a parameter of its own
        a = layout.axis
        sub, sub_shape = index[:a] + index[a + 1 :], shape[:a] + shape[a + 1 :]
        return np.stack([_read_shard(sub, tensor=tensor.parts[p], layout=layout.parts[p], cfg=cfg, shape=sub_shape,
                                     dtype=dtype) for p in range(index[a].start, index[a].stop)], axis=a)
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
    else:  # bfloat16 numbers whatever the dtype: a float32 model is the bfloat16 one's exact reference
        value = (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16).astype(dtype)
    return jax.lax.with_sharding_constraint(value, sharding)


def random_weights(abstract_state: nnx.State, mesh, seed: int = 0) -> nnx.State:
    """Random parameters of the right shapes, made on the devices one by one (load_format="dummy").

    One small jitted function per distinct shape: compiling the whole model's initialisation as one
    program takes minutes on a GPU for an 8B model, this takes seconds.
    """
    flat = nnx.to_flat_state(abstract_state)
    by_dotted = {".".join(map(str, path)): var for path, var in flat}
    quantized = {d for d in by_dotted if _quantization_of(by_dotted, d)}
    key = jax.random.PRNGKey(seed)
    for i, (dotted, var) in enumerate(by_dotted.items()):
        if dotted.removesuffix("_scale") in quantized and dotted.endswith("_scale"):
            continue  # set with its weight
        meta = var.get_metadata()
        target = var.get_value()
        sharding = named_sharding(meta["axes"], mesh, tuple(target.shape))
        dtype = np.float32 if dotted in quantized else target.dtype  # quantized weights: random floats, quantized
        value = _random_param(jax.random.fold_in(key, i), tuple(target.shape), dtype, meta.get("init", "normal"), sharding)
        if dotted in quantized:
            _set_quantized(by_dotted, dotted, value, mesh)
        else:
            var.set_value(value)
    return nnx.from_flat_state(flat)
