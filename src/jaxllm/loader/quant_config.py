"""What a checkpoint says about its own quantization, read before any weight is.

Two published FP8 layouts load (as weight-only FP8: ``models/quant.py``), and the same two
publishers' NVFP4 layouts and compressed-tensors MXFP4 (dequantized as they are read:
``loader/fp4.py``); compressed-tensors int8 loads as int8 weight-only, its other integer schemes,
GPTQ and AWQ dequantized as they are read (``loader/int_packed.py``); everything else that declares a
quantization is refused here with what was found and what is supported.

compressed-tensors (llm-compressor, ``config.json``)::

    "quantization_config": {"quant_method": "compressed-tensors",
        "format": "float-quantized" | "naive-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"type": "float", "num_bits": 8, "strategy": "tensor" | "channel", "symmetric": true, ...},
            "input_activations": {...} | null}},
        "ignore": ["lm_head"], "kv_cache_scheme": null | {...}, ...}

  tensors per quantized Linear ``X``: ``X.weight`` float8_e4m3fn ``[out, in]``, ``X.weight_scale``
  (bf16/f32; ``[1]`` or ``[]`` per tensor, ``[out, 1]`` per channel), and for static activation
  schemes ``X.input_scale`` ``[1]``. Dequantized weight = weight * weight_scale.

ModelOpt (NVIDIA TensorRT Model Optimizer): ``hf_quant_config.json`` =
``{"producer": {"name": "modelopt", ...}, "quantization": {"quant_algo": "FP8",
"kv_cache_quant_algo": null | "FP8", "exclude_modules": ["lm_head"]}}``, and/or in newer exports
``config.json``'s ``"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8",
"ignore": [...], ...}``; tensors ``X.weight`` float8_e4m3fn, ``X.weight_scale`` and ``X.input_scale``
float32 scalars (``[]``), with FP8 KV cache also ``k_scale`` / ``v_scale``.

compressed-tensors integer weights (``"type": "int"``): ``"format": "int-quantized"`` /
``"naive-quantized"`` store ``X.weight`` int8 ``[out, in]``; ``"pack-quantized"`` stores ``X.weight_packed``
int32 (``num_bits``-bit values, see ``loader/int_packed.py``) and ``X.weight_shape``; either has
``X.weight_scale`` (``[1]``, ``[out, 1]`` or ``[out, in / group_size]``), for asymmetric schemes
``X.weight_zero_point``, and with GPTQ's activation ordering ``X.weight_g_idx``. Dequantized weight
= (q - zero_point) * scale. 8-bit symmetric per-channel / per-tensor weights (W8A8 / W8A16 int8)
load as they are, as ``LLM(quantization="int8")``'s int8 weight-only projections; every other
integer scheme (W4A16, groups, zero points) is dequantized as it is read, like FP4. So are GPTQ
(``"quant_method": "gptq", "bits", "group_size", "desc_act", "checkpoint_format"``) and AWQ
(``"quant_method": "awq", "bits": 4, "group_size", "zero_point": true, "version": "gemm"``)
checkpoints: their layouts are in ``loader/int_packed.py``.

The static ``input_scale`` is read past: the weight-only path computes activations in the model's
dtype. The KV-cache scales (``self_attn.k_scale`` / ``self_attn.k_proj.k_scale`` ...) are taken by
the loader (``loader._take_kv_scales``) and become an fp8 KV pool's per-layer scales
(``KvCacheConfig(dtype="fp8")``); with another pool dtype they are unused. Which layers are quantized is read from the
tensors themselves (an fp8 weight has a scale beside it); a projection the checkpoint left
unquantized (its ``ignore`` list) is quantized to FP8 per channel at load, like
``LLM(quantization="fp8")``, and a quantized tensor outside the seven projections (a quantized
lm_head) is refused by the loader, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

SUPPORTED = (
    "compressed-tensors FP8 (float8_e4m3fn weights with per-tensor or per-channel weight_scale) "
    "and ModelOpt FP8 (quant_algo 'FP8'); NVFP4 of both (format 'nvfp4-pack-quantized', quant_algo "
    "'NVFP4') and compressed-tensors MXFP4 (format 'mxfp4-pack-quantized'), dequantized at load; "
    "compressed-tensors integer weights (formats 'int-quantized', 'naive-quantized', 'pack-quantized': "
    "int8 per channel or per tensor as int8 weight-only, other widths, groups and zero points dequantized at load); "
    "GPTQ (2, 3, 4 or 8 bits, checkpoint_format 'gptq' or 'gptq_v2') and AWQ (4 bits, version 'gemm'), "
    "dequantized at load"
)
MODELOPT_FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")  # per-tensor / per-channel weight scales
# compressed-tensors' FP4 formats: (the layout checkpoint_quantization returns -- a key of
# loader/fp4.py's LAYOUTS --, inputs per scale, strategy)
CT_FP4 = {"nvfp4-pack-quantized": ("nvfp4-compressed-tensors", 16, "tensor_group"),
          "mxfp4-pack-quantized": ("mxfp4-compressed-tensors", 32, "group")}


def _refuse(found: str) -> ValueError:
    return ValueError(
        f"this checkpoint is quantized as {found}, which jaxllm does not load; supported pre-quantized "
        f"checkpoints: {SUPPORTED}. Or load an unquantized (bf16/fp16/fp32) checkpoint with "
        "LLM(quantization='fp8' or 'int8')"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_quantization(folder: Path) -> tuple[str | None, str | None]:
    """(the weight quantization the checkpoint in folder carries: None, "fp8", "int8", an FP4 kind
    (a key of loader/fp4.py's LAYOUTS) or an integer layout (loader/int_packed.py's int_layout_name),
    a description of it).

    Raises ValueError for any declared quantization that is not a supported layout."""
    qc = _read_json(folder / "config.json").get("quantization_config")
    hf_quant = _read_json(folder / "hf_quant_config.json")
    if hf_quant.get("quantization") is not None or (hf_quant.get("producer") or {}).get("name") == "modelopt":
        return _modelopt(hf_quant.get("quantization") or {})
    if qc is None:
        return None, None
    if not isinstance(qc, dict):
        raise _refuse(f"quantization_config={qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method.startswith("modelopt"):
        return _modelopt(qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc)
    if method == "gptq":
        return _gptq(qc)
    if method == "awq":
        return _awq(qc)
    if method == "mxfp4":
        raise _refuse("MXFP4 (quant_method 'mxfp4': gpt-oss's MoE layout; compressed-tensors MXFP4 loads)")
    raise _refuse(f"quant_method {qc.get('quant_method')!r}")


def _modelopt(q: dict) -> tuple[str | None, str | None]:
    algo = q.get("quant_algo")
    if algo is None:  # only the KV cache is quantized: the weights are plain
        return None, None
    algo = str(algo).upper()
    if algo == "NVFP4":
        group = q.get("group_size", 16)
        if group != 16:
            raise _refuse(f"ModelOpt NVFP4 with group_size {group!r} (16 is the format's)")
        return "nvfp4-modelopt", "ModelOpt NVFP4"
    if "FP4" in algo:
        raise _refuse(f"ModelOpt quant_algo {algo!r} (of ModelOpt's FP4 formats only NVFP4 loads)")
    if algo not in MODELOPT_FP8_ALGOS:
        raise _refuse(f"ModelOpt quant_algo {algo!r}")
    return "fp8", f"ModelOpt {algo}"


def _compressed_tensors(qc: dict) -> tuple[str | None, str | None]:
    fmt = qc.get("format")
    if qc.get("transform_config"):
        raise _refuse("compressed-tensors with a transform_config (rotated weights)")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise _refuse(f"compressed-tensors sparsity format {sparsity.get('format')!r}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _refuse(f"compressed-tensors format {fmt!r} without config_groups")
    strategies, kinds = set(), set()
    for name, group in groups.items():
        w = group.get("weights") or {}
        gfmt = group.get("format") or fmt
        found = (
            f"compressed-tensors format {gfmt!r} (group {name!r}: {w.get('type')} {w.get('num_bits')}-bit weights, "
            f"strategy {w.get('strategy')!r})"
        )
        if gfmt in CT_FP4:
            kind, group_size, strategy = CT_FP4[gfmt]
            if (w.get("type"), w.get("num_bits"), w.get("group_size"), w.get("strategy")) != ("float", 4, group_size,
                                                                                            strategy):
                raise _refuse(found + f" ({kind.split('-')[0].upper()} is float 4-bit weights in groups of "
                                      f"{group_size}, strategy {strategy!r})")
            kinds.add(kind)
            continue
        if w.get("type") == "int":
            kinds.add(_ct_int(gfmt, w, found))
            continue
        if w.get("type") == "float" and w.get("num_bits") == 4:
            raise _refuse(found + "; of the FP4 formats only NVFP4 and compressed-tensors MXFP4 load")
        kinds.add("fp8")
        fp8 = (
            gfmt in ("float-quantized", "naive-quantized")
            and w.get("type") == "float"
            and w.get("num_bits") == 8
            and w.get("strategy") in ("tensor", "channel")
            and w.get("symmetric", True)
            and not w.get("dynamic", False)
        )
        if not fp8:
            raise _refuse(found)
        strategies.add(w["strategy"])
    if len(kinds) > 1:
        raise _refuse(f"compressed-tensors with groups of several formats ({', '.join(sorted(kinds))})")
    if kinds == {"int8"}:
        return "int8", "compressed-tensors int8 (symmetric, per channel / per tensor)"
    if kinds != {"fp8"}:
        kind = kinds.pop()
        return kind, f"compressed-tensors {kind.split('-')[0].upper()}"
    return "fp8", f"compressed-tensors FP8 ({'/'.join(sorted(strategies))} weight scales)"


CT_INT_FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")


def _ct_int(fmt: str, w: dict, found: str) -> str:
    """The kind of a compressed-tensors integer weight scheme: "int8" (8-bit, symmetric, per channel or
    per tensor, stored as int8: loaded as it is) or an integer layout of loader/int_packed.py
    (dequantized as read)."""
    from .int_packed import int_layout_name

    bits, strategy = w.get("num_bits"), w.get("strategy")
    why = None
    if fmt not in CT_INT_FORMATS:
        why = f"integer weights load from the formats {', '.join(CT_INT_FORMATS)}"
    elif not isinstance(bits, int) or not 1 <= bits <= 8 or (fmt != "pack-quantized" and bits != 8):
        why = "num_bits 1-8 packed ('pack-quantized'), 8 otherwise"
    elif strategy not in ("tensor", "channel", "group"):
        why = "strategy 'tensor', 'channel' or 'group'"
    elif strategy == "group" and not (isinstance(w.get("group_size"), int) and w["group_size"] > 0):
        why = "a group strategy needs a positive group_size"
    elif w.get("dynamic", False):
        why = "weights with static scales"
    if why:
        raise _refuse(found + f" ({why})")
    if bits == 8 and fmt != "pack-quantized" and strategy != "group" and w.get("symmetric", True):
        return "int8"
    return int_layout_name(bits, "ct-packed" if fmt == "pack-quantized" else "ct-unpacked")


def _gptq(qc: dict) -> tuple[str, str]:
    """GPTQ (AutoGPTQ / GPTQModel): dequantized as read (loader/int_packed.py)."""
    from .int_packed import int_layout_name

    bits, fmt = qc.get("bits"), str(qc.get("checkpoint_format") or "gptq").lower()
    found = f"GPTQ ({bits}-bit, checkpoint_format {fmt!r})"
    if bits not in (2, 3, 4, 8):
        raise _refuse(found + " (GPTQ loads at 2, 3, 4 or 8 bits)")
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(found + " (GPTQ loads in checkpoint_format 'gptq' or 'gptq_v2')")
    return int_layout_name(bits, "gptq" if fmt == "gptq" else "gptq-v2"), found


def _awq(qc: dict) -> tuple[str, str]:
    """AWQ (AutoAWQ, its GEMM layout): dequantized as read (loader/int_packed.py)."""
    from .int_packed import int_layout_name

    bits, version = qc.get("bits", qc.get("w_bit")), str(qc.get("version", "gemm")).lower()
    found = f"AWQ ({bits}-bit, version {version!r}, zero_point {qc.get('zero_point', True)})"
    if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
        raise _refuse(found + " (AWQ loads at 4 bits, version 'gemm', with zero points)")
    return int_layout_name(4, "awq"), found
