"""Declarative HF-name -> parameter-path maps, and the few tensor transforms they use.

A map is a list of ``(hf_pattern, param_path, transform)``; ``{i}`` in both stands for a layer index.
The generic loader (``jaxllm.loader``) executes any map: it never knows which model it loads.
Transforms take the HF tensor (numpy, PyTorch's ``[out, in]`` layout) and the config, and return the
parameter in the layout of the module (see ``models/llama.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def identity(w, cfg):
    return w


def transpose(w, cfg):
    return w.T


def in_to_heads(num_heads_attr: str) -> Transform:
    """[heads*head_dim, embed] -> [embed, heads, head_dim]."""

    def f(w, cfg):
        return w.T.reshape(cfg.hidden_size, getattr(cfg, num_heads_attr), cfg.head_dim)

    return f


def bias_to_heads(num_heads_attr: str) -> Transform:
    """[heads*head_dim] -> [heads, head_dim]."""

    def f(w, cfg):
        return w.reshape(getattr(cfg, num_heads_attr), cfg.head_dim)

    return f


def heads_to_out(w, cfg):
    """[embed, heads*head_dim] -> [heads, head_dim, embed]."""
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


@dataclass(frozen=True)
class Rule:
    hf: str
    param: str
    transform: Transform = identity
    optional: bool = False  # present only with some config switches


@dataclass
class WeightMap:
    rules: list[Rule]
    ignore: tuple[str, ...] = ()  # HF tensors that carry nothing we need (e.g. cached rope tables)

    def __post_init__(self):
        self._compiled = [
            (re.compile("^" + re.escape(r.hf).replace(r"\{i\}", r"(\d+)") + "$"), r) for r in self.rules
        ]
        self._ignore = [re.compile(p) for p in self.ignore]

    def match(self, hf_name: str) -> tuple[str, Transform] | None:
        """The parameter path and transform for an HF tensor name; None if it is to be ignored.

        Raises KeyError for a tensor the map does not know: a checkpoint with unexpected weights is
        more likely a different architecture than something to skip silently.
        """
        for pattern, rule in self._compiled:
            m = pattern.match(hf_name)
            if m:
                path = rule.param.replace("{i}", m.group(1)) if m.groups() else rule.param
                return path, rule.transform
        if any(p.search(hf_name) for p in self._ignore):
            return None
        raise KeyError(hf_name)

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        """Every HF tensor name this map expects for cfg (used to map GGUF names onto HF ones)."""
        names = []
        for r in self.rules:
            if "{i}" in r.hf:
                names += [r.hf.replace("{i}", str(i)) for i in range(cfg.num_layers)]
            else:
                names.append(r.hf)
        return names


LLAMA_WEIGHT_MAP = WeightMap(
    rules=[
        Rule("model.embed_tokens.weight", "embed"),
        Rule("lm_head.weight", "lm_head", transpose, optional=True),
        Rule("model.norm.weight", "norm.weight"),
        Rule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
        Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q", in_to_heads("num_heads")),
        Rule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k", in_to_heads("num_kv_heads")),
        Rule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v", in_to_heads("num_kv_heads")),
        Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o", heads_to_out),
        Rule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_bias", bias_to_heads("num_heads"), True),
        Rule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_bias", bias_to_heads("num_kv_heads"), True),
        Rule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_bias", bias_to_heads("num_kv_heads"), True),
        Rule("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_bias", optional=True),
        Rule("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight", optional=True),
        Rule("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight", optional=True),
        Rule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate", transpose),
        Rule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up", transpose),
        Rule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down", transpose),
        Rule("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.mlp.gate_bias", optional=True),
        Rule("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.mlp.up_bias", optional=True),
        Rule("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down_bias", optional=True),
    ],
    ignore=(r"rotary_emb\.inv_freq$",),
)
