"""FP4 checkpoints (NVFP4, MXFP4), dequantized as they are read.

Both store a projection's weight ``[out, in]`` as 4-bit floats (e2m1: a sign, two exponent bits
and one mantissa bit; the values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two a byte (the
first of a pair in the low nibble), with one scale per block of consecutive inputs of a row. NVFP4:
a float8_e4m3fn scale per 16 inputs and one float32 scale for the whole tensor; MXFP4 (OCP
microscaling): a power of two per 32 inputs (E8M0, a uint8 exponent e: 2 ** (e - 127)), no tensor
scale. The published layouts, per quantized Linear ``X``:

- compressed-tensors (``"format": "nvfp4-pack-quantized"``): ``X.weight_packed`` uint8
  ``[out, in / 2]``, ``X.weight_scale`` float8_e4m3fn ``[out, in / 16]``, ``X.weight_global_scale``
  float32 ``[1]``; weight = e2m1 * weight_scale / weight_global_scale. (``X.input_global_scale``:
  the W4A4 scheme's activation scale.)
- ModelOpt (``quant_algo: "NVFP4"``): ``X.weight`` uint8 ``[out, in / 2]``, ``X.weight_scale``
  float8_e4m3fn ``[out, in / 16]``, ``X.weight_scale_2`` float32 ``[]``; weight = e2m1 *
  weight_scale * weight_scale_2. (``X.input_scale``: the activation scale.)
- compressed-tensors MXFP4 (``"format": "mxfp4-pack-quantized"``): ``X.weight_packed`` uint8
  ``[out, in / 2]``, ``X.weight_scale`` uint8 ``[out, in / 32]`` (E8M0); weight = e2m1 * 2 **
  (weight_scale - 127).

jaxllm has no FP4 matmul: each such weight is dequantized on the host as it is read (float32: the
product of an e2m1 value and an e4m3 scale is exact there), so the model holds the weights of an
unquantized checkpoint -- in its dtype, or quantized again at load by ``LLM(quantization="fp8" /
"int8" / "fp8-w8a8")``. The activation scales are not used. Layers the checkpoint left in 16 bits
(its ignore / exclude list) pass through as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .weights import LazyTensor, dequantizing

# e2m1 by its 4-bit code: bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
NVFP4_GROUP = 16  # inputs per float8 block scale


@dataclass(frozen=True)
class Fp4Layout:
    packed: str  # the packed weight's name suffix
    global_scale: str | None  # the per-tensor scale's (NVFP4)
    divide: bool  # weight = e2m1 * block scale / global (compressed-tensors), or * global (ModelOpt)
    unused: tuple[str, ...]  # the activation scales' (weight-only here)
    group: int = NVFP4_GROUP  # inputs per block scale
    e8m0: bool = False  # block scales are uint8 exponents (MXFP4), not float8_e4m3fn


# by the name loader/quant_config.checkpoint_quantization gives a checkpoint's FP4 layout
LAYOUTS = {
    "nvfp4-compressed-tensors": Fp4Layout("weight_packed", "weight_global_scale", True, ("input_global_scale",)),
    "nvfp4-modelopt": Fp4Layout("weight", "weight_scale_2", False, ("input_scale",)),
    "mxfp4-compressed-tensors": Fp4Layout("weight_packed", None, False, (), group=32, e8m0=True),
}


def unpack_e2m1(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n / 2] -> float32 [..., n]: each byte's low nibble, then its high one."""
    packed = np.asarray(packed, np.uint8)
    pairs = np.stack([E2M1[packed & 0x0F], E2M1[packed >> 4]], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantized_fp4(tensors, layout: str):
    """Pass (name, LazyTensor) pairs through, each FP4 projection's packed weight, block scales and
    (NVFP4) tensor scale -- in any order, from any file of the checkpoint -- replaced by one float32
    ``X.weight`` that dequantizes the rows it is asked for; the activation scales dropped. `layout`:
    a key of LAYOUTS."""
    lay = LAYOUTS[layout]
    pieces = (lay.packed, "weight_scale") + ((lay.global_scale,) if lay.global_scale else ())

    def is_piece(suffix, tensor):  # a 16-bit weight of a layer left unquantized is not one
        return suffix in pieces and (suffix != "weight" or np.dtype(tensor.dtype) == np.uint8)

    return dequantizing(tensors, is_piece, lambda prefix, parts: _dequantizing(prefix, [parts[p] for p in pieces], lay),
                        need=pieces, label="FP4", drop=lay.unused, hint=f" (a {layout} weight needs {', '.join(pieces)})")


def _dequantizing(prefix: str, parts: list[LazyTensor], lay: Fp4Layout) -> LazyTensor:
    packed, scale, *tensor_scale = parts
    if packed.dtype is None or np.dtype(packed.dtype) != np.uint8 or len(packed.shape) != 2:
        raise ValueError(f"FP4 checkpoint: {prefix}.{lay.packed} is {packed.dtype} {packed.shape}; expected 2-D uint8")
    out, cols = packed.shape[0], 2 * packed.shape[1]
    if tuple(scale.shape) != (out, cols // lay.group) or cols % lay.group:
        raise ValueError(
            f"FP4 checkpoint: {prefix}.weight_scale has shape {tuple(scale.shape)}; expected {(out, cols // lay.group)} "
            f"(one scale per {lay.group} inputs of a {out} x {cols} weight)"
        )
    factor = np.float32(1)
    if tensor_scale:
        g = np.asarray(tensor_scale[0].read(None), np.float32).reshape(-1)
        if g.size != 1 or not np.isfinite(g[0]) or g[0] == 0:
            raise ValueError(f"FP4 checkpoint: {prefix}.{lay.global_scale} holds {g.tolist()[:4]}; expected one "
                             "finite, non-zero scale")
        factor = np.float32(1 / g[0] if lay.divide else g[0])

    def read(index):
        rows = index[0] if index is not None else slice(None)
        values = unpack_e2m1(packed.read((rows, slice(None))))
        blocks = np.asarray(scale.read((rows, slice(None))))
        blocks = np.ldexp(np.float32(1), blocks.astype(np.int32) - 127) if lay.e8m0 else blocks.astype(np.float32)
        w = values * np.repeat(blocks, lay.group, axis=-1) * factor
        return w if index is None else w[(slice(None), *index[1:])]

    return LazyTensor((out, cols), read, np.float32)
