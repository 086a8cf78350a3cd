"""FP4 checkpoints (loader/fp4.py): NVFP4 in the compressed-tensors and ModelOpt layouts and
compressed-tensors MXFP4, built here from their documented form, load dequantized and give the
logits and tokens of their dequantized twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.loader.fp4 import E2M1, dequantized_fp4, unpack_e2m1
from jaxllm.loader.weights import LazyTensor
from test_quantization import PROJ, _logits, _params, _rel, tiny, write_with_twin  # noqa: F401  (tiny: the fixture)

PROMPT = "The capital of France is"


def test_unpack_e2m1_reads_the_low_nibble_first():
    # 0x2F: low nibble 0xF (sign, exponent 3, mantissa 1: -6), high 0x2 (exponent 1: 1.0);
    # 0x93: low 0x3 (1.5), high 0x9 (-0.5); 0x70: 0 then 6
    got = unpack_e2m1(np.array([[0x2F, 0x93], [0x70, 0x88]], np.uint8))
    np.testing.assert_array_equal(got, [[-6, 1, 1.5, -0.5], [0, 6, -0.0, -0.0]])
    assert sorted(set(np.abs(E2M1).tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def _nvfp4(w: np.ndarray):
    """w [out, in] float32 -> (packed uint8 [out, in/2], block scales as float8 [out, in/16], the
    tensor's scale s2, e2m1 * block [out, in]: the weight is that times s2)."""
    import ml_dtypes

    out, cols = w.shape
    s2 = np.float32(np.abs(w).max() / (448 * 6))
    blocks = w.reshape(out, cols // 16, 16)
    bs = (np.abs(blocks).max(-1) / 6 / s2).astype(ml_dtypes.float8_e4m3fn)
    bs32 = bs.astype(np.float32)
    scaled = blocks / np.where(bs32 == 0, 1, bs32)[..., None] / s2
    codes = np.abs(scaled[..., None] - E2M1).argmin(-1).astype(np.uint8).reshape(out, cols)  # nearest e2m1
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    v = E2M1[codes].reshape(out, cols // 16, 16) * bs32[..., None]
    return packed.astype(np.uint8), bs, s2, v.reshape(out, cols).astype(np.float32)


def _mxfp4(w: np.ndarray):
    """w [out, in] float32 -> (packed uint8 [out, in/2], E8M0 exponents uint8 [out, in/32], the
    dequantized weight): each block's power of two the smallest that brings its largest value to <= 6."""
    out, cols = w.shape
    blocks = w.reshape(out, cols // 32, 32)
    e = np.ceil(np.log2(np.maximum(np.abs(blocks).max(-1), 1e-30) / 6)).astype(np.int32)
    pow2 = np.ldexp(np.float32(1), e)
    codes = np.abs((blocks / pow2[..., None])[..., None] - E2M1).argmin(-1).astype(np.uint8).reshape(out, cols)
    deq = (E2M1[codes].reshape(out, cols // 32, 32) * pow2[..., None]).reshape(out, cols)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), (e + 127).astype(np.uint8), deq.astype(np.float32)


def _write_nvfp4(src: Path, dst: Path, layout: str, keep_16bit: tuple[str, ...] = ()) -> None:
    """The tiny checkpoint as `layout` NVFP4 in dst (projections in keep_16bit left as they are, as
    an ignore list leaves them), and its dequantized float32 twin in dst-ref."""
    import torch
    from safetensors.torch import load_file

    out, ref = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        proj = name.removesuffix(".weight")
        if (not name.endswith(".weight") or proj.split("layers.")[-1].split(".", 1)[-1] not in PROJ
                or proj in keep_16bit):
            out[name] = ref[name] = w
            continue
        if layout == "mxfp4":  # weight = e2m1 * 2 ** (weight_scale - 127)
            packed, exps, deq = _mxfp4(w.float().numpy())
            out[proj + ".weight_packed"], out[proj + ".weight_scale"] = torch.from_numpy(packed), torch.from_numpy(exps)
            ref[name] = torch.from_numpy(deq)
            continue
        packed, bs, s2, v = _nvfp4(w.float().numpy())
        scale = torch.from_numpy(bs.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        if layout == "compressed-tensors":  # weight = e2m1 * weight_scale / weight_global_scale
            g = np.float32(1 / s2)
            out[proj + ".weight_packed"] = torch.from_numpy(packed)
            out[proj + ".weight_global_scale"] = torch.tensor([g], dtype=torch.float32)
            out[proj + ".input_global_scale"] = torch.tensor([100.0])
            deq = v / g
        else:  # ModelOpt: weight = e2m1 * weight_scale * weight_scale_2
            out[proj + ".weight"] = torch.from_numpy(packed)
            out[proj + ".weight_scale_2"] = torch.tensor(float(s2), dtype=torch.float32)
            out[proj + ".input_scale"] = torch.tensor(0.01)
            deq = v * s2
        out[proj + ".weight_scale"] = scale
        ref[name] = torch.from_numpy(deq)
    cfg = write_with_twin(src, dst, out, ref)
    if layout == "mxfp4":
        mx = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False)
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": mx}}, "ignore": ["lm_head", *keep_16bit]}
    elif layout == "compressed-tensors":
        fp4 = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, dynamic=False)
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": fp4,
                                          "input_activations": {**fp4, "dynamic": "local"}}},
            "ignore": ["lm_head", *keep_16bit]}
    else:
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.29.0"},
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": ["lm_head", *keep_16bit]}}))
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def nvfp4(tiny, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("nvfp4")
    for layout in ("compressed-tensors", "modelopt", "mxfp4"):
        _write_nvfp4(tiny, root / layout, layout, keep_16bit=("model.layers.1.mlp.down_proj",))
    return root


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt", "mxfp4"])
def test_nvfp4_checkpoint_matches_its_dequantized_twin(nvfp4, layout):
    """Each layout (NVFP4 of both publishers, compressed-tensors MXFP4) loads as an unquantized
    model holding the dequantized weights (a layer on the ignore list as it was): the twin's
    logits and greedy tokens."""
    path = nvfp4 / layout
    with LLM(str(path), max_seq_len=128, compilation_cache=False) as llm:
        assert llm.model_config.quantization is None
        params = _params(llm)
        logits = _logits(llm)
        toks = llm.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    with LLM(str(path) + "-ref", max_seq_len=128, compilation_cache=False) as ref:
        ref_params = _params(ref)
        ref_logits = _logits(ref)
        ref_toks = ref.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert params.keys() == ref_params.keys()
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-6, atol=0, err_msg=k)
    assert _rel(logits, ref_logits) < 1e-5
    assert toks == ref_toks


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_nvfp4_checkpoint_quantized_again_at_load(nvfp4, quantization):
    """LLM(quantization=...) over an NVFP4 checkpoint quantizes its dequantized weights as it would
    an unquantized checkpoint's: the twin's logits under the same quantization."""
    path = nvfp4 / "modelopt"
    with LLM(str(path), max_seq_len=128, compilation_cache=False, quantization=quantization) as llm:
        assert llm.model_config.quantization == quantization
        logits = _logits(llm)
    with LLM(str(path) + "-ref", max_seq_len=128, compilation_cache=False, quantization=quantization) as ref:
        ref_logits = _logits(ref)
    assert _rel(logits, ref_logits) < 1e-5


def test_dequantized_rows_and_columns_are_the_whole_tensors_slices():
    """A shard's read (rows and columns of the weight) is the slice of the whole dequantized tensor."""
    rng = np.random.default_rng(0)
    packed, bs, s2, v = _nvfp4(rng.standard_normal((8, 64)).astype(np.float32))
    deq = v * s2

    def lazy(a):
        return LazyTensor(a.shape, lambda index, a=a: a[index if index is not None else ...], a.dtype)

    (name, w), = dequantized_fp4([("x.weight_scale_2", lazy(np.array(s2))), ("x.weight", lazy(packed)),
                                  ("x.weight_scale", lazy(bs)), ("x.input_scale", lazy(np.array(0.5, np.float32)))],
                                 "nvfp4-modelopt")
    assert name == "x.weight" and w.shape == (8, 64) and w.dtype == np.float32
    np.testing.assert_array_equal(w.read(None), deq)
    np.testing.assert_array_equal(w.read((slice(2, 5), slice(16, 48))), deq[2:5, 16:48])


def test_an_incomplete_nvfp4_weight_is_refused_naming_it():
    packed, bs, _, _ = _nvfp4(np.ones((4, 32), np.float32))
    tensors = [("m.q_proj.weight_packed", LazyTensor(packed.shape, lambda i: packed, np.uint8)),
               ("m.q_proj.weight_scale", LazyTensor(bs.shape, lambda i: bs, bs.dtype))]
    with pytest.raises(ValueError, match=r"'m.q_proj' has \['weight_packed', 'weight_scale'\] but not "
                                         r"\['weight_global_scale'\]"):
        list(dequantized_fp4(tensors, "nvfp4-compressed-tensors"))


@pytest.mark.parametrize("update,found", [
    ({"quant_method": "mxfp4"}, "MXFP4"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}, "NVFP4 with group_size 32"),
    ({"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}}}}, "MXFP4 is float 4-bit weights in "
     "groups of 32"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {
        "a": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}},
        "b": {"format": "float-quantized", "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}},
     "groups of several formats (fp8, nvfp4-compressed-tensors)"),
])
def test_other_fp4_checkpoints_are_refused(tmp_path, tiny, update, found):  # noqa: F811
    path = tmp_path / "ckpt"
    shutil.copytree(tiny, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": update}))
    with pytest.raises(ValueError, match="supported pre-quantized checkpoints") as info:
        LLM(str(path), compilation_cache=False)
    assert found in str(info.value) and "NVFP4 of both" in str(info.value) and "MXFP4 (format" in str(info.value)
