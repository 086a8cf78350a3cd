"""Integer checkpoints -- compressed-tensors' (W4A16, W8A16 with groups or zero points, ...), GPTQ
and AWQ -- dequantized as they are read.

The layouts (llm-compressor / compressed-tensors; ``loader/quant_config.py`` reads the config), per
quantized Linear ``X`` with a weight ``[out, in]``:

- ``"format": "pack-quantized"``: ``X.weight_packed`` int32 ``[out, ceil(in * bits / 32)]``, each
  row a little-endian bit stream of ``bits``-bit values (value ``j`` at bits ``j * bits`` ...
  ``j * bits + bits - 1``, a value crossing a word boundary continues in the next word), each value
  stored plus ``2 ** (bits - 1)`` (unsigned); ``X.weight_shape`` int ``[2]`` (= ``[out, in]``);
  asymmetric schemes' ``X.weight_zero_point`` packed the same way down the columns (int32
  ``[ceil(out * bits / 32), groups]``).
- ``"int-quantized"`` / ``"naive-quantized"``: ``X.weight`` int8 ``[out, in]``; a zero point, where
  there is one, int8 ``[out, groups]``.

Both: ``X.weight_scale`` ``[1]`` (tensor), ``[out, 1]`` (channel) or ``[out, in / group_size]``
(group); ``X.weight_g_idx`` int ``[in]`` (the group of each input, GPTQ's activation ordering), where
there is one, else input ``i`` is in group ``i // (in / groups)``. Weight = (q - zero_point[g]) *
scale[g]. The activations' scheme (``input_activations``) is not used: jaxllm's model then holds the
dequantized weights, in its dtype, or quantized again at load (``LLM(quantization="int8" / "fp8")``).
8-bit symmetric per-channel / per-tensor weights do not come here: they load as int8 weight-only
projections as they are.

GPTQ (AutoGPTQ / GPTQModel, ``quant_method "gptq"``) and AWQ (AutoAWQ, ``quant_method "awq"``,
``version "gemm"``) store the weight transposed, ``[in, out]``, as unsigned values packed ``32 / bits``
to an int32 word (value ``k`` of a word at bits ``k * bits``): GPTQ's ``X.qweight`` int32
``[in * bits / 32, out]`` packed down the inputs, ``X.qzeros`` int32 ``[groups, out * bits / 32]``,
``X.scales`` ``[groups, out]`` and ``X.g_idx`` ``[in]``; its ``checkpoint_format "gptq"`` (v1, the
default) stores each zero point minus one, ``"gptq_v2"`` as it is. AWQ's ``X.qweight`` int32
``[in, out / 8]`` packs 4-bit values along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble ``k``
of a word holds output ``8 c + order[k]``), ``X.qzeros`` int32 ``[groups, out / 8]`` the same way,
``X.scales`` ``[groups, out]``; input ``i`` is in group ``i // group_size``. Weight = (q - zero) * scale.
"""

from __future__ import annotations

import re

import numpy as np

from .weights import LazyTensor, dequantizing

LAYOUT_KINDS = ("ct-packed", "ct-unpacked", "gptq", "gptq-v2", "awq")
_NAME = re.compile(rf"^int([1-8])-({'|'.join(LAYOUT_KINDS)})$")
_PIECES = {"weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx"}
_GPTQ_PIECES = {"qweight", "qzeros", "scales", "g_idx"}
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble k of an AWQ word holds output 8 c + AWQ_ORDER[k]


def int_layout_name(bits: int, kind: str) -> str:
    """The name checkpoint_quantization gives an integer layout to dequantize as read; kind: one of
    LAYOUT_KINDS (compressed-tensors packed / unpacked, GPTQ v1 / v2, AWQ)."""
    assert kind in LAYOUT_KINDS, kind
    return f"int{bits}-{kind}"


def is_int_layout(name) -> bool:
    return isinstance(name, str) and _NAME.match(name) is not None


def unpack_int32(packed: np.ndarray, bits: int, n: int, signed: bool = True) -> np.ndarray:
    """int32 [rows, words] of packed `bits`-bit values (a little-endian bit stream per row) -> their
    first n values, int32 [rows, n]: signed (compressed-tensors stores each plus 2 ** (bits - 1)) or
    as stored (GPTQ, AWQ)."""
    raw = np.ascontiguousarray(np.asarray(packed).astype("<i4")).view(np.uint8)  # [rows, 4 * words], LSB first
    rows = raw.shape[0]
    if bits == 8:
        u = raw
    elif bits == 4:  # a byte's low nibble, then its high one
        u = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(rows, -1)
    else:
        stream = np.unpackbits(raw, axis=-1, bitorder="little")[:, : n * bits].reshape(rows, n, bits)
        u = (stream.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(-1)
    return u[:, :n].astype(np.int32) - ((1 << (bits - 1)) if signed else 0)


def dequantized_int(tensors, layout: str):
    """Pass (name, LazyTensor) pairs through, each quantized projection's pieces (its int8 or packed
    weight, scale, zero point, g_idx -- in any order, from any file) replaced by one float32
    ``X.weight`` that dequantizes the rows it is asked for. `layout`: int_layout_name's."""
    m = _NAME.match(layout)
    bits, kind = int(m.group(1)), m.group(2)
    if kind in ("gptq", "gptq-v2", "awq"):
        return dequantizing(tensors, lambda suffix, tensor: suffix in _GPTQ_PIECES,
                            lambda prefix, parts: _transposed(prefix, parts, bits, kind),
                            need=("qweight", "qzeros", "scales"), label="GPTQ" if kind != "awq" else "AWQ")
    packed = kind == "ct-packed"

    def is_piece(suffix, tensor):  # an unpacked int8 weight is one; a 16-bit weight (ignore list) is not
        return suffix in _PIECES or (suffix == "weight" and not packed and np.dtype(tensor.dtype) == np.int8)

    need = ("weight_packed", "weight_shape", "weight_scale") if packed else ("weight", "weight_scale")
    return dequantizing(tensors, is_piece, lambda prefix, parts: _dequantizing(prefix, parts, bits, packed),
                        need=need, label="integer")


def _input_groups(label: str, name: str, g_idx, cols: int, groups: int) -> np.ndarray:
    """Each of the cols inputs' group: the checkpoint's g_idx (activation order) where it has one,
    else consecutive groups of ceil(cols / groups)."""
    if g_idx is None:
        return np.arange(cols) // -(-cols // groups)
    g = np.asarray(g_idx.read(None)).astype(np.int64).reshape(-1)
    if g.shape != (cols,) or g.min() < 0 or g.max() >= groups:
        raise ValueError(f"{label} checkpoint: {name} must give each of the {cols} inputs a group in [0, {groups})")
    return g


def _lazy_dequantized(out: int, cols: int, read_rows, zero: np.ndarray, scale: np.ndarray, g) -> LazyTensor:
    """The float32 [out, cols] weight (q - zero[:, g]) * scale[:, g] (zero, scale: [out, groups]),
    read_rows(rows) giving q's rows (any numeric dtype, [rows, cols])."""

    def read(index):
        rows = index[0] if index is not None else slice(None)
        q = np.asarray(read_rows(rows)).astype(np.float32)
        w = (q - zero[rows][:, g]) * scale[rows][:, g]  # float32: exact up to the product's one rounding
        return w if index is None else w[(slice(None), *index[1:])]

    return LazyTensor((out, cols), read, np.float32)


def _transposed(prefix: str, parts: dict, bits: int, kind: str) -> LazyTensor:
    """A GPTQ / AWQ projection's HF-layout ``[out, in]`` float32 weight."""
    what = "GPTQ" if kind.startswith("gptq") else "AWQ"
    qweight, per_word = parts["qweight"], 32 // bits
    scale = np.asarray(parts["scales"].read(None), np.float32)
    groups, out = scale.shape
    cols = qweight.shape[0] * 32 // bits if what == "GPTQ" else qweight.shape[0]
    if what == "AWQ" and tuple(qweight.shape) != (cols, out // per_word):
        raise ValueError(f"AWQ checkpoint: {prefix}.qweight has shape {tuple(qweight.shape)}; expected "
                         f"{(cols, out // per_word)} for scales of {out} outputs")
    if what == "GPTQ" and qweight.shape[1] != out:
        raise ValueError(f"GPTQ checkpoint: {prefix}.qweight has {qweight.shape[1]} outputs, its scales {out}")
    zero = unpack_int32(np.asarray(parts["qzeros"].read(None)), bits, out, signed=False).astype(np.float32)
    if kind == "gptq":
        zero = (zero + 1) % (1 << bits)  # v1 stores zero - 1 (a zero of 0 wraps, as GPTQ's own kernels read it)
    g = _input_groups(what, f"{prefix}.g_idx", parts.get("g_idx"), cols, groups)
    if what == "AWQ":
        order = (np.arange(out).reshape(-1, per_word)[:, np.argsort(AWQ_ORDER)]).reshape(-1)
        zero = zero[:, order]

    def read_rows(rows):  # HF rows: outputs
        if what == "GPTQ":  # outputs unpacked: read just theirs
            return unpack_int32(np.asarray(qweight.read((slice(None), rows))).T, bits, cols, signed=False)
        return unpack_int32(np.asarray(qweight.read(None)), bits, out, signed=False)[:, order].T[rows]

    return _lazy_dequantized(out, cols, read_rows, zero.T, scale.T, g)


def _dequantizing(prefix: str, parts: dict, bits: int, packed: bool) -> LazyTensor:
    """A compressed-tensors projection's ``[out, in]`` float32 weight."""
    if packed:
        out, cols = (int(v) for v in np.asarray(parts["weight_shape"].read(None)).reshape(-1))
        words = -(-cols * bits // 32)
        weight = parts["weight_packed"]
        if tuple(weight.shape) != (out, words):
            raise ValueError(f"integer checkpoint: {prefix}.weight_packed has shape {tuple(weight.shape)}; expected "
                             f"{(out, words)} ({out} x {cols} {bits}-bit values)")
    else:
        weight = parts["weight"]
        out, cols = weight.shape
    scale = np.asarray(parts["weight_scale"].read(None), np.float32)
    scale = np.broadcast_to(scale.reshape(1, 1), (out, 1)) if scale.size == 1 else scale.reshape(out, -1)
    groups = scale.shape[1]
    if cols % groups:
        raise ValueError(f"integer checkpoint: {prefix}.weight_scale has {groups} groups a row for {cols} inputs")
    zero = np.zeros((out, groups), np.float32)
    if "weight_zero_point" in parts:
        z = np.asarray(parts["weight_zero_point"].read(None))
        if packed and z.dtype == np.int32 and z.shape[0] != out:  # packed down the columns
            z = unpack_int32(z.T, bits, out).T
        zero = np.broadcast_to(z.astype(np.float32).reshape(-1, 1) if z.size == 1 else z.reshape(out, groups),
                               (out, groups)).astype(np.float32)
    g = _input_groups("integer", f"{prefix}.weight_g_idx", parts.get("weight_g_idx"), cols, groups)

    def read_rows(rows):
        q = weight.read((rows, slice(None)))
        return unpack_int32(q, bits, cols) if packed else q

    return _lazy_dequantized(out, cols, read_rows, zero, scale, g)
