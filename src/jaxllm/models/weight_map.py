"""Declarative HF-name -> parameter-path maps, and the few tensor transforms they use.

A map is a list of ``(hf_pattern, param_path, transform)``; ``{i}`` in both stands for a layer index.
The generic loader (``jaxllm.loader``) executes any map: it never knows which model it loads.
A transform is a ``Layout``: how the module's parameter (see ``models/llama.py``) sits relative to
the HF tensor, which also tells the loader which slice of the HF tensor each device's shard needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import numpy as np

from .config import ModelConfig

@dataclass(frozen=True)
class Layout:
    """How a parameter is laid out relative to its HF tensor (PyTorch's ``[out, in]`` layout).

    param = (hf.T if transpose else hf), with axis ``split_axis`` of that split into
    ``(cfg.<heads_attr>, cfg.head_dim)``. Because the map is this simple, any shard of the parameter
    that keeps head_dim whole is one rectangular slice of the HF tensor (``hf_index``): the loader
    reads just that slice from the checkpoint for each device.
    """

    transpose: bool = False
    split_axis: int | None = None
    heads_attr: str | None = None

    def __call__(self, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return self.to_param(w, cfg, None)

    def to_param(self, w: np.ndarray, cfg: ModelConfig, heads: int | None) -> np.ndarray:
        """The parameter (or a shard of it with `heads` heads) from the HF tensor (or its slice)."""
        w = w.T if self.transpose else w
        if self.split_axis is None:
            return w
        s = self.split_axis
        h = getattr(cfg, self.heads_attr) if heads is None else heads
        return w.reshape(*w.shape[:s], h, cfg.head_dim, *w.shape[s + 1 :])

    def param_shape(self, hf_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...] | None:
        """The parameter's shape for an HF tensor of hf_shape (None if the split does not fit)."""
        shape = tuple(reversed(hf_shape)) if self.transpose else tuple(hf_shape)
        if self.split_axis is None:
            return shape
        s, h, d = self.split_axis, getattr(cfg, self.heads_attr), cfg.head_dim
        if shape[s] != h * d:
            return None
        return shape[:s] + (h, d) + shape[s + 1 :]

    def hf_index(self, index: tuple[slice, ...], cfg: ModelConfig) -> tuple[slice, ...] | None:
        """The HF slice holding param[index] (slices with concrete bounds); None if not one slice."""
        idx = list(index)
        if self.split_axis is not None:
            s, d = self.split_axis, cfg.head_dim
            heads, dims = idx[s], idx[s + 1]
            if (dims.start, dims.stop) != (0, d):
                return None
            idx[s : s + 2] = [slice(heads.start * d, heads.stop * d)]
        return tuple(reversed(idx)) if self.transpose else tuple(idx)


    def k_minor(self) -> "Layout":
        """The layout of the same 2-D HF projection stored K-minor ([out..., in...]: PyTorch's own
        order, so no transpose; see ``models/quant.py``)."""
        if not self.transpose:
            raise ValueError("only a transposed projection layout has a K-minor twin")
        split = None if self.split_axis is None else 1 - self.split_axis
        return Layout(transpose=False, split_axis=split, heads_attr=self.heads_attr)


identity = Layout()
transpose = Layout(transpose=True)


def in_to_heads(num_heads_attr: str) -> Layout:
    """[heads*head_dim, embed] -> [embed, heads, head_dim]."""
    return Layout(transpose=True, split_axis=1, heads_attr=num_heads_attr)


def bias_to_heads(num_heads_attr: str) -> Layout:
    """[heads*head_dim] -> [heads, head_dim]."""
    return Layout(split_axis=0, heads_attr=num_heads_attr)


heads_to_out = Layout(transpose=True, split_axis=0, heads_attr="num_heads")  # [embed, heads*hd] -> [heads, hd, embed]
Transform = Layout


@dataclass(frozen=True)
class ScaleLayout(Layout):
    """A pre-quantized weight's scale: per tensor (``[]`` or ``[1]``) or per output channel (``[out]``
    or ``[out, 1]``) in the checkpoint -> the parameter's one float per output channel (a per-tensor
    scale repeated), split into heads like the weight's output. Scales are tiny: always read whole."""

    size_attr: str | None = None  # the cfg attribute of the output size, for outputs not split into heads

    def _out(self, cfg: ModelConfig) -> int:
        if self.split_axis is not None:
            return getattr(cfg, self.heads_attr) * cfg.head_dim
        return getattr(cfg, self.size_attr)

    def to_param(self, w: np.ndarray, cfg: ModelConfig, heads: int | None) -> np.ndarray:
        w = np.asarray(w).reshape(-1)
        if w.size == 1:
            w = np.broadcast_to(w, (self._out(cfg),))
        return super().to_param(w, cfg, None)

    def param_shape(self, hf_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...] | None:
        n, size = self._out(cfg), int(np.prod(hf_shape, dtype=np.int64))
        if len(hf_shape) > 2 or (len(hf_shape) == 2 and hf_shape[1] != 1) or size not in (1, n):
            return None
        return super().param_shape((n,), cfg)

    def hf_index(self, index, cfg):
        return None


def weight_scale(num_heads_attr: str | None = None, size_attr: str | None = None) -> ScaleLayout:
    """The scale of a projection whose output is split into heads (num_heads_attr) or not (size_attr)."""
    if num_heads_attr is not None:
        return ScaleLayout(split_axis=0, heads_attr=num_heads_attr)
    return ScaleLayout(size_attr=size_attr)


@dataclass(frozen=True)
class Rule:
    hf: str
    param: str
    transform: Transform = identity
    optional: bool = False  # present only with some config switches
    # a fused parameter (axis "stack" in its metadata) is built from several HF tensors: this one
    # is its part `part` along that axis, laid out by `transform` like a parameter of its own
    part: int | None = None


@dataclass
class WeightMap:
    rules: list[Rule]
    ignore: tuple[str, ...] = ()  # HF tensors that carry nothing we need (e.g. cached rope tables)

    def __post_init__(self):
        self._compiled = [
            (re.compile("^" + re.escape(r.hf).replace(r"\{i\}", r"(\d+)") + "$"), r) for r in self.rules
        ]
        self._ignore = [re.compile(p) for p in self.ignore]

    def match(self, hf_name: str) -> tuple[str, Transform, int | None] | None:
        """The parameter path, transform and part (see ``Rule.part``) for an HF tensor name; None if
        it is to be ignored.

        Raises KeyError for a tensor the map does not know: a checkpoint with unexpected weights is
        more likely a different architecture than something to skip silently.
        """
        for pattern, rule in self._compiled:
            m = pattern.match(hf_name)
            if m:
                path = rule.param.replace("{i}", m.group(1)) if m.groups() else rule.param
                return path, rule.transform, rule.part
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
        Rule("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.kv", in_to_heads("num_kv_heads"), part=0),
        Rule("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.kv", in_to_heads("num_kv_heads"), part=1),
        Rule("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o", heads_to_out),
        Rule("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_bias", bias_to_heads("num_heads"), True),
        Rule("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.kv_bias", bias_to_heads("num_kv_heads"), True, 0),
        Rule("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.kv_bias", bias_to_heads("num_kv_heads"), True, 1),
        Rule("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_bias", optional=True),
        Rule("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight", optional=True),
        Rule("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight", optional=True),
        Rule("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_up", transpose, part=0),
        Rule("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.gate_up", transpose, part=1),
        Rule("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down", transpose),
        Rule("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.mlp.gate_up_bias", optional=True, part=0),
        Rule("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.mlp.gate_up_bias", optional=True, part=1),
        Rule("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down_bias", optional=True),
        # pre-quantized FP8 (compressed-tensors, ModelOpt) and int8 (compressed-tensors) checkpoints: the projections' weight scales
        Rule("model.layers.{i}.self_attn.q_proj.weight_scale", "layers.{i}.attn.q_scale", weight_scale("num_heads"), True),
        Rule("model.layers.{i}.self_attn.k_proj.weight_scale", "layers.{i}.attn.kv_scale", weight_scale("num_kv_heads"), True, 0),
        Rule("model.layers.{i}.self_attn.v_proj.weight_scale", "layers.{i}.attn.kv_scale", weight_scale("num_kv_heads"), True, 1),
        Rule("model.layers.{i}.self_attn.o_proj.weight_scale", "layers.{i}.attn.o_scale", weight_scale(size_attr="hidden_size"), True),
        Rule("model.layers.{i}.mlp.gate_proj.weight_scale", "layers.{i}.mlp.gate_up_scale", weight_scale(size_attr="intermediate_size"), True, 0),
        Rule("model.layers.{i}.mlp.up_proj.weight_scale", "layers.{i}.mlp.gate_up_scale", weight_scale(size_attr="intermediate_size"), True, 1),
        Rule("model.layers.{i}.mlp.down_proj.weight_scale", "layers.{i}.mlp.down_scale", weight_scale(size_attr="hidden_size"), True),
    ],
    # static activation scales (input_scale) of pre-quantized checkpoints: the weight-only path
    # computes activations in the model's dtype; KV-cache scales (k_scale, v_scale) are taken by the
    # loader before the map sees them (they configure an fp8 KV pool, not a parameter)
    ignore=(r"rotary_emb\.inv_freq$", r"\.(input_scale|input_zero_point|k_scale|v_scale)$"),
)
