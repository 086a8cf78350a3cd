"""HF architecture name -> (module class, weight map)."""

from __future__ import annotations

from dataclasses import dataclass

from .llama import LlamaForCausalLM
from .weight_map import LLAMA_WEIGHT_MAP, WeightMap


@dataclass(frozen=True)
class Architecture:
    module: type
    weight_map: WeightMap
    gguf_arch: str | None = None  # the gguf package's architecture name, where GGUF files are read


_REGISTRY: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(LlamaForCausalLM, LLAMA_WEIGHT_MAP, gguf_arch="llama"),
    "MistralForCausalLM": Architecture(LlamaForCausalLM, LLAMA_WEIGHT_MAP),
    "Qwen2ForCausalLM": Architecture(LlamaForCausalLM, LLAMA_WEIGHT_MAP),
    "Qwen3ForCausalLM": Architecture(LlamaForCausalLM, LLAMA_WEIGHT_MAP),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"architecture {name!r} is not supported; supported architectures: "
            + ", ".join(supported_architectures())
        ) from None
