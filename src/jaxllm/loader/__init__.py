"""From ``LLM(model=...)`` to a model on device: resolve, read config and tokenizer, place weights.

Sources: HF safetensors (single or sharded), GGUF, random weights (load_format="dummy"), and
jaxllm's own Orbax checkpoints written by ``LLM.save``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from ..models import ModelConfig, get_architecture
from ..models.config import architecture_name
from .resolve import ResolvedModel, resolve_model
from .orbax_ckpt import is_jaxllm_checkpoint, restore_params, saved_dtype, saved_quantization, save_checkpoint
from .quant_config import checkpoint_quantization
from .weights import iter_gguf, iter_safetensors, place_weights, random_weights


DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
LOAD_FORMATS = ("auto", "dummy")
QUANTIZATIONS = (None, "fp8", "int8")


@dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    hf_config: object
    tokenizer: object
    dtype: object
    source: ResolvedModel


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


def resolve_quantization(requested: str | None, src: ResolvedModel, orbax: bool) -> str | None:
    """The projections' weight quantization: what the checkpoint carries (a pre-quantized HF
    checkpoint, or a jaxllm save of a quantized model), else what LLM(quantization=...) asks for.
    Raises ValueError for an unsupported checkpoint quantization or a request that contradicts it."""
    if src.is_gguf:
        return requested
    if orbax:
        found, what = saved_quantization(src.path), "a jaxllm checkpoint saved with quantization"
    else:
        found, what = checkpoint_quantization(src.path)
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
    return found if found is not None else requested


def load_model(model, *, dtype="auto", load_format="auto", tokenizer=None, revision=None, mesh,
               quantization=None) -> LoadedModel:
    src = resolve_model(model, revision)
    hf_config = _hf_config(src)
    arch = get_architecture(architecture_name(hf_config))  # before reading fields it may not have
    orbax = not src.is_gguf and is_jaxllm_checkpoint(src.path)
    cfg = replace(ModelConfig.from_hf(hf_config), quantization=resolve_quantization(quantization, src, orbax))
    if orbax and dtype == "auto":
        dtype = saved_dtype(src.path)
    jdtype = resolve_dtype(dtype, cfg)
    factory = partial(arch.module, cfg, jdtype)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0))))
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
        state = place_weights(abstract_state, tensors, cfg, arch.weight_map, mesh)
    module = nnx.merge(graphdef, state)
    tok = load_tokenizer(src, tokenizer, revision)
    return LoadedModel(module, cfg, hf_config, tok, jdtype, src)


__all__ = ["DTYPES", "LOAD_FORMATS", "QUANTIZATIONS", "LoadedModel", "load_model", "load_tokenizer", "save_checkpoint"]
