"""From ``LLM(model=...)`` to a model on device: resolve, read config and tokenizer, place weights.

Sources: HF safetensors (single or sharded), GGUF, random weights (load_format="dummy"), and
jaxllm's own Orbax checkpoints written by ``LLM.save``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import ModelConfig, get_architecture
from ..models.config import architecture_name
from ..models.llama import can_fuse_qkv, fuse_qkv
from ..sharding import tensor_parallel_size
from ..switches import env_auto_flag
from ..pallas.fp8_gemv import gemv_wanted
from ..pallas.gemv import gemv_wanted as triton_gemv_wanted
from .resolve import ResolvedModel, resolve_model
from .orbax_ckpt import (
    is_jaxllm_checkpoint,
    restore_params,
    save_checkpoint,
    saved_dtype,
    saved_fp8_lm_head,
    saved_quantization,
)
from .fp4 import LAYOUTS as FP4_LAYOUTS, dequantized_fp4
from .int_packed import dequantized_int, is_int_layout
from .quant_config import checkpoint_quantization
from .weights import iter_gguf, iter_safetensors, place_weights, random_weights


DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = (None, "fp8", "int8", "fp8-w8a8")


@dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    hf_config: object
    tokenizer: object
    dtype: object
    source: ResolvedModel
    # a pre-quantized checkpoint's static FP8 KV-cache scales, one (k_scale, v_scale) per layer
    kv_scales: list[tuple[float, float]] | None = None


def _hf_config(src: ResolvedModel):
    from transformers import AutoConfig

    if src.is_gguf:
        return AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return AutoConfig.from_pretrained(str(src.path), trust_remote_code=False)


def load_tokenizer(src: ResolvedModel, tokenizer=None, revision=None):
    """The checkpoint's tokenizer, or `tokenizer`: a folder, a .gguf file, an HF id, or a tokenizer object."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is not None:
        p = Path(tokenizer).expanduser()
        if p.is_dir():
            src = ResolvedModel(p, False)
        elif p.is_file() and p.suffix == ".gguf":
            src = ResolvedModel(p, True)
        else:
            src = resolve_model(str(tokenizer), revision)
    if src.is_gguf:
        return AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=False)


def resolve_dtype(dtype: str, cfg: ModelConfig):
    if dtype == "auto":
        name = cfg.dtype if cfg.dtype in DTYPES else "float32"
        return DTYPES[name]
    return DTYPES[dtype]


def resolve_quantization(requested: str | None, src: ResolvedModel, orbax: bool) -> tuple[str | None, str | None]:
    """(the projections' weight quantization: what the checkpoint carries (a pre-quantized HF
    checkpoint, or a jaxllm save of a quantized model), else what LLM(quantization=...) asks for;
    the layout to dequantize the checkpoint's weights from as they are read (FP4: loader/fp4.py; integer:
    loader/int_packed.py), or None -- such a checkpoint loads as an unquantized one, quantized again if asked).
    Raises ValueError for an unsupported checkpoint quantization or a request that contradicts it."""
    if src.is_gguf:
        return requested, None
    if orbax:
        found, what = saved_quantization(src.path), "a jaxllm checkpoint saved with quantization"
    else:
        found, what = checkpoint_quantization(src.path)
        if found in FP4_LAYOUTS or is_int_layout(found):
            return requested, found
    if orbax and requested != found and requested is not None:
        raise ValueError(
            f"quantization={requested!r} does not match this jaxllm checkpoint, saved with quantization="
            f"{found!r}; pass quantization={found!r} (or None), or load the original checkpoint to quantize it"
        )
    if not orbax and found is not None and requested not in (None, found):
        raise ValueError(
            f"quantization={requested!r} does not match this checkpoint, which is pre-quantized ({what}); "
            f"pass quantization=None or {found!r}"
        )
    return (found if found is not None else requested), None


def fused_qkv_wanted(mesh=None, quantization: str | None = None) -> bool:
    """Whether q/k/v run as one projection where the tensor-parallel layout allows (models/llama.py:
    can_fuse_qkv). JAXLLM_FUSED_QKV=1 / 0 forces it; by default ("auto") on GPUs, on a mesh of
    several, or on one where the weights are fp8 (`quantization` "fp8"). Measured (BENCHMARKS.md):
    at tp=2 each shard's fused q/k/v is one pallas.gemv instead of two (the k/v one at ~1.1 TB/s),
    batch 1 4.26 -> 4.06 ms on 2x H200 ("Ninth session"); fp8 on one H100, one gemv at batch 1,
    4.02 -> 3.93 and 4.09 -> 3.97 ms (tenth and eleventh sessions), and in fp8-w8a8's FP8 x FP8
    calls XLA merges the three dots sharing their input into one by concatenating the three fp8
    weights on every call (21.6 us a layer at 256 rows, "Eleventh session"). bf16 on one H100 stays
    apart: the fused GEMM gained 0.03 ms at batch 1 and lost ~8% of 1000 x 128/128 throughput at
    256 rows (sixth session)."""
    forced = env_auto_flag("JAXLLM_FUSED_QKV")
    if forced is not None:
        return forced
    if mesh is None or mesh.devices.flat[0].platform != "gpu":
        return False
    return tensor_parallel_size(mesh) > 1 or quantization == "fp8"


def fused_norm_wanted(mesh=None) -> bool:
    """Whether decode-sized residual adds and the RMSNorms after them run as one kernel
    (pallas.add_norm; models/llama.py). JAXLLM_FUSED_NORM=1 / 0 forces it; by default ("auto") on
    NVIDIA GPUs with JAX's Pallas Triton backend: batch 1 at 8B shapes tp=2 3.96 -> 3.84 ms (2x H200),
    one H100 bf16 6.12 -> 6.03, fp8 4.23 -> 4.17 (BENCHMARKS.md "Tenth session"); elsewhere XLA's
    fusions (on a CPU backend the kernel would run in Pallas interpret mode)."""
    from ..pallas.gemv import triton_available

    forced = env_auto_flag("JAXLLM_FUSED_NORM")
    if forced is not None:
        return forced
    return mesh is not None and mesh.devices.flat[0].platform == "gpu" and triton_available()


def fused_silu_quant_wanted(mesh=None) -> bool:
    """Whether fp8-w8a8's FP8 x FP8 MLP calls run the gate/up product's scaling, silu(gate) * up
    and the per-token quantization for the down projection as one kernel (pallas.silu_mul_quant;
    models/llama.py, one device only). JAXLLM_FUSED_SILU_QUANT=1 / 0 forces it; by default ("auto")
    on NVIDIA GPUs with JAX's Pallas Triton backend. Measured on an H100 (BENCHMARKS.md "Twelfth
    session"): alone 65 vs XLA's 92 us at 1024 rows (21 vs 31 at 256), and 1000 x 128/128 fp8-w8a8
    with an fp8 KV cache at 1024 rows 18,843 -> 19,665 output tok/s on the same machine."""
    from ..pallas.gemv import triton_available

    forced = env_auto_flag("JAXLLM_FUSED_SILU_QUANT")
    if forced is not None:
        return forced
    return mesh is not None and mesh.devices.flat[0].platform == "gpu" and triton_available()


def fused_norm_quant_wanted(mesh=None) -> bool:
    """Whether fp8-w8a8's FP8 x FP8 calls get their input from one kernel that adds the residual,
    normalizes and quantizes per token (pallas.add_norm.add_rmsnorm_quant; models/llama.py, one
    device only). JAXLLM_FUSED_NORM_QUANT=1 / 0; "auto" (the default) leaves it off until it is
    measured on a GPU (XLA's 3-4 kernels take ~19 us a layer-norm at 1024 rows on an H100, the bytes
    ~8; BENCHMARKS.md "Twelfth session"). The mesh will decide once measured, as for the others."""
    forced = env_auto_flag("JAXLLM_FUSED_NORM_QUANT")
    return bool(forced)


def fp8_lm_head_wanted(cfg, mesh, saved: bool | None) -> bool:
    """JAXLLM_FP8_LM_HEAD=1: the LM head quantized to fp8 at load as the projections are
    (ModelConfig.quantize_lm_head) -- for fp8 weights, an untied head and one device; anything else
    is refused naming the switch. Off by default: the checkpoints' own FP8 formats and vLLM /
    TensorRT-LLM keep the head in 16 bits. `saved`: a jaxllm (Orbax) checkpoint's own choice (None:
    another kind of checkpoint), which it is restored with."""
    wanted = env_auto_flag("JAXLLM_FP8_LM_HEAD")
    if saved is not None and wanted is None:
        wanted = saved
    if saved and not wanted:
        raise ValueError("JAXLLM_FP8_LM_HEAD=0: this jaxllm checkpoint was saved with an fp8 LM head; load the "
                         "original checkpoint for a 16-bit one")
    if not wanted:
        return False
    why = ("the weights are not fp8" if cfg.quantization != "fp8" else
           "the LM head is tied to the embedding" if cfg.tie_word_embeddings else
           "it runs on one device only" if mesh.devices.size > 1 else
           "this jaxllm checkpoint was saved with a 16-bit head" if saved is False else None)
    if why:
        raise ValueError(f"JAXLLM_FP8_LM_HEAD=1: {why}")
    return True


def load_model(model, *, dtype="auto", load_format="auto", tokenizer=None, revision=None, mesh,
               quantization=None) -> LoadedModel:
    src = resolve_model(model, revision)
    hf_config = _hf_config(src)
    arch = get_architecture(architecture_name(hf_config))  # before reading fields it may not have
    orbax = not src.is_gguf and is_jaxllm_checkpoint(src.path)
    w8a8 = quantization == "fp8-w8a8"  # fp8 weights; the activations too in large calls
    stored, dequant = resolve_quantization("fp8" if w8a8 else quantization, src, orbax)
    if w8a8 and stored != "fp8":
        raise ValueError(f"quantization='fp8-w8a8' needs fp8 weights; this checkpoint holds {stored} weights")
    cfg = replace(ModelConfig.from_hf(hf_config), quantization=stored, fp8_activations=w8a8,
                  fp8_gemv=stored == "fp8" and gemv_wanted(mesh), triton_gemv=triton_gemv_wanted(mesh),
                  fused_norm=fused_norm_wanted(mesh), fused_silu_quant=fused_silu_quant_wanted(mesh),
                  fused_norm_quant=fused_norm_quant_wanted(mesh))
    cfg = replace(cfg, quantize_lm_head=fp8_lm_head_wanted(cfg, mesh, saved_fp8_lm_head(src.path) if orbax else None))
    if orbax and dtype == "auto":
        dtype = saved_dtype(src.path)
    jdtype = resolve_dtype(dtype, cfg)
    def abstract(cfg):  # the module's graph and its parameters' shapes, axes and dtypes (no arrays)
        return nnx.split(nnx.eval_shape(lambda: arch.module(cfg, jdtype, rngs=nnx.Rngs(0))))

    graphdef, abstract_state = abstract(cfg)
    kv_scales = None
    if load_format == "dummy":
        state = random_weights(abstract_state, mesh)
    elif orbax:
        state = restore_params(src.path, abstract_state, mesh)
    else:
        if src.is_gguf:
            if arch.gguf_arch is None:
                raise ValueError(f"GGUF files of {cfg.architecture} are not supported (only Llama)")
            tensors = iter_gguf(src.path, cfg, arch.weight_map, arch.gguf_arch)
        else:
            tensors = iter_safetensors(src.path)
            if dequant is not None:
                tensors = (dequantized_fp4 if dequant in FP4_LAYOUTS else dequantized_int)(tensors, dequant)
        found: dict[int, dict[str, float]] = {}
        state = place_weights(abstract_state, _take_kv_scales(tensors, found), cfg, arch.weight_map, mesh)
        kv_scales = _kv_scales(found, cfg.num_layers)
    if fused_qkv_wanted(mesh, stored) and can_fuse_qkv(cfg, tensor_parallel_size(mesh)):
        # loaded as q and kv (the checkpoints' and Orbax's layout), run as one q/k/v projection
        cfg = replace(cfg, fused_qkv=True)
        graphdef, fused_abstract = abstract(cfg)
        state = fuse_qkv(state, fused_abstract, cfg, mesh)
    module = nnx.merge(graphdef, state)
    tok = load_tokenizer(src, tokenizer, revision)
    return LoadedModel(module, cfg, hf_config, tok, jdtype, src, kv_scales)


# Where FP8 checkpoints keep their static KV-cache scales: compressed-tensors ``self_attn.k_scale``,
# ModelOpt / AutoFP8 ``self_attn.k_proj.k_scale`` (vLLM reads the same names).
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:(?:k_proj|v_proj|attn)\.)?([kv])_scale$")


def _take_kv_scales(tensors, found: dict):
    """Pass tensors through, taking out (into found[layer]["k" / "v"]) the per-layer KV-cache scales."""
    for name, tensor in tensors:
        m = _KV_SCALE.match(name)
        if m is None:
            yield name, tensor
            continue
        value = np.asarray(tensor.read(None), np.float32).reshape(-1)
        if value.size != 1:
            raise ValueError(f"checkpoint tensor {name!r} holds {value.size} KV-cache scales; one per layer is supported")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = float(value[0])


def _kv_scales(found: dict, num_layers: int) -> list[tuple[float, float]] | None:
    if not found:
        return None
    missing = [i for i in range(num_layers) if set(found.get(i, {})) != {"k", "v"}]
    if missing:
        raise ValueError(f"the checkpoint has KV-cache scales for some layers but not both for layers {missing[:8]}")
    return [(found[i]["k"], found[i]["v"]) for i in range(num_layers)]


__all__ = ["DTYPES", "LOAD_FORMATS", "QUANTIZATIONS", "LoadedModel", "load_model", "load_tokenizer", "save_checkpoint"]
