"""Weight-only quantization: LLM(quantization="fp8" | "int8"), pre-quantized FP8 checkpoints
(compressed-tensors, ModelOpt) built here from their published layouts, refusals, Orbax, tensor
parallelism, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_tiny_checkpoint
from jaxllm import LLM, SamplingParams
from jaxllm.models.quant import dequantize_weight, k_minor_order, qeinsum, quantize_weight

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = [[1, 504, 3000, 17, 44, 9, 250, 6001, 12, 8], [1, 33, 7, 9000, 41, 2, 5, 77, 301, 11]]


def _logits(llm, ids=IDS):
    return np.asarray(llm._engine.runner.hidden_states(jnp.asarray(ids, jnp.int32))[1])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _params(llm):
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(llm._engine.runner.params)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("llama3", tmp_path_factory.mktemp("q") / "tiny")


@contextlib.contextmanager
def _unfused():
    """q and k/v as separate parameters (JAXLLM_FUSED_QKV=0), for the checks that read them by name
    (their fusion is tested in test_fused_qkv.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLLM_FUSED_QKV", "0")
        yield


@pytest.fixture(scope="module")
def plain(tiny):
    with _unfused(), LLM(str(tiny), max_seq_len=128, compilation_cache=False) as llm:
        return dict(logits=_logits(llm), params=_params(llm))


# -- the arithmetic ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp8", "int8"])
@pytest.mark.parametrize("axes,out_axes", [(("embed", "heads", "head_dim"), ("heads", "head_dim")),
                                           (("heads", "head_dim", "embed"), ("embed",))])
def test_quantize_weight_per_output_channel(mode, axes, out_axes):
    w = np.random.default_rng(0).normal(size=(16, 4, 8)).astype(np.float32)
    w[:, 1] *= 10.0  # channels of very different ranges: per-channel scales must follow them
    q, scale = quantize_weight(jnp.asarray(w), mode, axes, out_axes)
    reduce = tuple(i for i, a in enumerate(axes) if a not in out_axes)
    amax = np.abs(w).max(axis=reduce)
    np.testing.assert_allclose(np.asarray(scale), amax / (448.0 if mode == "fp8" else 127.0), rtol=1e-6)
    assert q.dtype == (jnp.float8_e4m3fn if mode == "fp8" else jnp.int8) and scale.dtype == jnp.float32
    deq = np.asarray(dequantize_weight(q, scale, axes, out_axes))
    s = np.expand_dims(np.asarray(scale), reduce)
    if mode == "int8":  # symmetric rounding to nearest: within half a step, the extremes exactly +-127
        assert np.all(np.abs(deq - w) <= 0.5 * s * (1 + 1e-5))
        assert np.abs(np.asarray(q).astype(np.int32)).max() == 127
    else:  # e4m3: 3 mantissa bits, so within 2^-4 relative above the subnormals
        assert np.all(np.abs(deq - w) <= np.maximum(2.0**-4 * np.abs(w), 2.0**-9 * s) * (1 + 1e-5))
    # the dequantizing matmul equals the matmul with the dequantized weight (fp8: stored K-minor)
    rng = np.random.default_rng(1)
    if axes[0] == "embed":
        spec, xs = "bte,ehd->bthd", rng.normal(size=(2, 3, 16)).astype(np.float32)
    else:
        spec, xs = "bthd,hde->bte", rng.normal(size=(2, 3, 16, 4)).astype(np.float32)
    stored = jnp.transpose(q, k_minor_order(axes, out_axes)) if mode == "fp8" else q
    np.testing.assert_allclose(np.asarray(qeinsum(spec, jnp.asarray(xs), stored, scale)),
                               np.einsum(spec, xs, deq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,x_shape,axes,out_axes", [
    ("bte,ehd->bthd", (4, 32, 16), ("embed", "heads", "head_dim"), ("heads", "head_dim")),
    ("bthd,hde->bte", (4, 32, 4, 8), ("heads", "head_dim", "embed"), ("embed",)),
    ("...e,ef->...f", (128, 16), ("embed", "mlp"), ("mlp",)),
])
def test_fp8_w8a8_matmul(spec, x_shape, axes, out_axes):
    """Calls of FP8_MATMUL_MIN_TOKENS tokens or more multiply FP8 x FP8 (activations quantized per
    token): the dot's operands are both float8_e4m3fn in the traced program, the weight K-minor
    (contracting dims innermost, no transpose), and the result is the dequantized product within
    fp8's activation rounding; fewer tokens multiply weight-only, exactly."""
    import jax

    from jaxllm.models.quant import FP8_MATMUL_MIN_TOKENS

    rng = np.random.default_rng(2)
    w_shape = {"bte,ehd->bthd": (16, 4, 8), "bthd,hde->bte": (4, 8, 16), "...e,ef->...f": (16, 24)}[spec]
    w = rng.normal(size=w_shape).astype(np.float32)
    q, scale = quantize_weight(jnp.asarray(w), "fp8", axes, out_axes)
    deq = np.asarray(dequantize_weight(q, scale, axes, out_axes))
    stored = jnp.transpose(q, k_minor_order(axes, out_axes))
    x = rng.normal(size=x_shape).astype(np.float32)
    x[0] *= 30.0  # tokens of very different ranges: the activation scale must be per token
    assert int(np.prod(x_shape[: len(x_shape) - (2 if spec.startswith("bthd") else 1)])) >= FP8_MATMUL_MIN_TOKENS
    got = np.asarray(qeinsum(spec, jnp.asarray(x), stored, scale, w8a8=True))
    # exactly the W8A8 recipe: x quantized per token (amax / 448 over the contracting dims) ...
    n_in = 2 if spec.startswith("bthd") else 1
    x_scale = np.abs(x).max(axis=tuple(range(x.ndim - n_in, x.ndim)), keepdims=True) / 448.0
    xq = np.asarray(jnp.asarray(x / x_scale).astype(jnp.float8_e4m3fn)).astype(np.float32) * x_scale
    np.testing.assert_allclose(got, np.einsum(spec, xq, deq), rtol=1e-4, atol=1e-4)
    # ... which stays near the unquantized product
    assert _rel(got, np.einsum(spec, x, deq)) < 0.03
    hlo = jax.jit(lambda a, b, c: qeinsum(spec, a, b, c, w8a8=True)).lower(jnp.asarray(x), stored, scale).as_text()
    dots = [l for l in hlo.splitlines() if "dot_general" in l]
    assert len(dots) == 1 and dots[0].count("f8E4M3FN") >= 2, dots
    np.testing.assert_allclose(np.asarray(qeinsum(spec, jnp.asarray(x), stored, scale)), np.einsum(spec, x, deq),
                               rtol=1e-5, atol=1e-4)  # plain "fp8": weight-only at any size
    # decode-sized calls: weight-only, the same numbers as the dequantized weight
    small = jnp.asarray(x[:1, :1] if spec != "...e,ef->...f" else x[:1])
    np.testing.assert_allclose(np.asarray(qeinsum(spec, small, stored, scale, w8a8=True)),
                               np.einsum(spec, np.asarray(small), deq), rtol=1e-5, atol=1e-5)


# -- LLM(quantization=...) -----------------------------------------------------------------------
@pytest.mark.parametrize("mode,tol", [("fp8", 0.08), ("int8", 0.03)])
def test_quantization_at_load(tiny, plain, mode, tol):
    with _unfused(), LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization=mode) as llm:
        assert llm.model_config.quantization == mode
        params = _params(llm)
        logits = _logits(llm)
    wdtype = jnp.float8_e4m3fn if mode == "fp8" else jnp.int8
    for name in ("attn.q", "attn.kv", "attn.o", "mlp.gate_up", "mlp.down"):
        p = f"layers.1.{name}"
        assert params[p].dtype == wdtype and params[p + "_scale"].dtype == jnp.float32
    # exactly the quantization of the unquantized model's weights
    axes = {"attn.q": (("embed", "heads", "head_dim"), ("heads", "head_dim")),
            "attn.o": (("heads", "head_dim", "embed"), ("embed",)), "mlp.down": (("mlp", "embed"), ("embed",)),
            "mlp.gate_up": (("embed", "stack", "mlp"), ("stack", "mlp")),
            "attn.kv": (("embed", "kv_heads", "stack", "head_dim"), ("kv_heads", "stack", "head_dim"))}
    for name, (ax, out) in axes.items():
        q, s = quantize_weight(jnp.asarray(plain["params"][f"layers.0.{name}"]), mode, ax, out)
        if mode == "fp8":  # stored K-minor: [out..., in...]
            q = jnp.transpose(q, k_minor_order(ax, out))
        np.testing.assert_array_equal(np.asarray(params[f"layers.0.{name}"]).astype(np.float32), np.asarray(q).astype(np.float32))
        np.testing.assert_allclose(np.asarray(params[f"layers.0.{name}_scale"]), np.asarray(s), rtol=1e-7)
    for name in ("embed", "lm_head", "norm.weight", "layers.0.input_norm.weight"):  # not quantized
        assert params[name].dtype == jnp.float32
        np.testing.assert_array_equal(params[name], plain["params"][name])
    err = _rel(logits, plain["logits"])
    assert 0 < err < tol, err
    assert (logits.argmax(-1) == plain["logits"].argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("mode", ["fp8", "fp8-w8a8"])
def test_fp8_lm_head_opt_in(tiny, plain, monkeypatch, mode):
    """JAXLLM_FP8_LM_HEAD=1: the head is quantized per vocabulary row exactly as a projection (stored
    K-minor), the logits move a little more than with a 16-bit head and keep the top tokens."""
    with LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization=mode) as llm:
        head16 = _logits(llm)
    monkeypatch.setenv("JAXLLM_FP8_LM_HEAD", "1")
    with LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization=mode) as llm:
        assert llm.model_config.quantize_lm_head
        params, logits = _params(llm), _logits(llm)
    ax, out = ("embed", "vocab"), ("vocab",)
    q, scale = quantize_weight(jnp.asarray(plain["params"]["lm_head"]), "fp8", ax, out)
    np.testing.assert_array_equal(params["lm_head"].astype(np.float32),
                                  np.asarray(jnp.transpose(q, k_minor_order(ax, out))).astype(np.float32))
    np.testing.assert_allclose(params["lm_head_scale"], np.asarray(scale), rtol=1e-7)
    err, err16 = _rel(logits, plain["logits"]), _rel(head16, plain["logits"])
    assert err16 < err < 0.1, (err, err16)
    assert (logits.argmax(-1) == plain["logits"].argmax(-1)).mean() >= 0.9


def test_fp8_lm_head_survives_an_orbax_round_trip(tiny, tmp_path, monkeypatch):
    """LLM.save records the fp8 head; the checkpoint restores with it (no switch needed) and the same
    logits; a 16-bit-head checkpoint refuses the switch, an fp8-head one refuses it off."""
    with monkeypatch.context() as mp:
        mp.setenv("JAXLLM_FP8_LM_HEAD", "1")
        with LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization="fp8") as llm:
            before = _logits(llm)
            llm.save(tmp_path / "head8")
    with LLM(str(tmp_path / "head8"), max_seq_len=128, compilation_cache=False) as llm:
        assert llm.model_config.quantize_lm_head and _params(llm)["lm_head"].dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(_logits(llm), before)
        llm.save(tmp_path / "again")
    with LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization="fp8") as llm:
        llm.save(tmp_path / "head16")
    monkeypatch.setenv("JAXLLM_FP8_LM_HEAD", "1")
    with pytest.raises(ValueError, match="JAXLLM_FP8_LM_HEAD=1: this jaxllm checkpoint was saved with a 16-bit head"):
        LLM(str(tmp_path / "head16"), max_seq_len=128, compilation_cache=False)
    monkeypatch.setenv("JAXLLM_FP8_LM_HEAD", "0")
    with pytest.raises(ValueError, match="JAXLLM_FP8_LM_HEAD=0: this jaxllm checkpoint was saved with an fp8 LM head"):
        LLM(str(tmp_path / "again"), max_seq_len=128, compilation_cache=False)


@pytest.mark.parametrize("variant,mode,why", [("llama3", "int8", "the weights are not fp8"),
                                              ("llama_tied", "fp8", "the LM head is tied to the embedding")])
def test_fp8_lm_head_refusals(tmp_path, monkeypatch, variant, mode, why):
    monkeypatch.setenv("JAXLLM_FP8_LM_HEAD", "1")
    path = write_tiny_checkpoint(variant, tmp_path / variant)
    with pytest.raises(ValueError, match=f"JAXLLM_FP8_LM_HEAD=1: {why}"):
        LLM(str(path), max_seq_len=64, compilation_cache=False, quantization=mode)


def test_quantization_with_dummy_weights(tiny):
    with LLM(str(tiny), max_seq_len=64, compilation_cache=False, quantization="int8", load_format="dummy") as llm:
        p = _params(llm)
        assert p["layers.0.mlp.gate_up"].dtype == jnp.int8 and np.abs(np.asarray(p["layers.0.mlp.gate_up"])).max() == 127
        assert np.isfinite(_logits(llm)).all()


def test_bad_quantization_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"quantization must be one of \[None, 'fp8', 'int8', 'fp8-w8a8'\], got 'fp4'"):
        LLM("/no/such/model", quantization="fp4")


# -- pre-quantized checkpoints, written here from the published layouts --------------------------------
def _fp8(w, scale):
    import torch

    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def write_with_twin(src: Path, dst: Path, tensors: dict, twin: dict) -> dict:
    """Copies of the checkpoint in src as dst (holding `tensors`) and dst-ref (its dequantized twin,
    holding `twin`); returns src's config for the caller to complete and write into dst."""
    from safetensors.torch import save_file

    for folder, held in ((dst, tensors), (Path(str(dst) + "-ref"), twin)):
        shutil.copytree(src, folder)
        (folder / "model.safetensors").unlink()
        save_file(held, str(folder / "model.safetensors"))
    return json.loads((src / "config.json").read_text())


def _write_prequantized(src: Path, dst: Path, kind: str) -> None:
    """A copy of the tiny f32 checkpoint as `kind` FP8 in dst, and its dequantized f32 twin in dst-ref."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(src / "model.safetensors"))
    out, ref = {}, {}
    for name, w in tensors.items():
        proj = name.removesuffix(".weight")
        if not (name.endswith(".weight") and proj.split("layers.")[-1].split(".", 1)[-1] in PROJ):
            out[name] = ref[name] = w
            continue
        if kind == "ct-channel":  # per output channel, [out, 1], float32
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        elif kind == "ct-tensor":  # per tensor, [1], bfloat16 (as llm-compressor writes it)
            scale = (w.abs().amax() / 448.0).reshape(1).to(torch.bfloat16)
        else:  # modelopt: float32 scalars, shape []
            scale = w.abs().amax() / 448.0
        q = _fp8(w, scale.float())
        out[name], out[proj + ".weight_scale"] = q, scale
        out[proj + ".input_scale"] = torch.tensor([0.02] if kind.startswith("ct") else 0.02, dtype=scale.dtype)
        ref[name] = q.float() * scale.float()
    cfg = write_with_twin(src, dst, out, ref)
    if kind.startswith("ct"):
        args = dict(num_bits=8, type="float", symmetric=True, dynamic=False, group_size=None)
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": {**args, "strategy": kind.removeprefix("ct-")},
                "input_activations": {**args, "strategy": "tensor"}, "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
        }
    elif kind == "modelopt-config":  # newer ModelOpt exports: config.json only
        cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"],
                                      "producer": {"name": "modelopt", "version": "0.37.0"}}
    else:  # older ModelOpt exports: hf_quant_config.json beside a plain config
        (dst / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def prequantized(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("preq")
    out = {}
    for kind in ("ct-tensor", "ct-channel", "modelopt", "modelopt-config"):
        _write_prequantized(tiny, root / kind, kind)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["ct-tensor", "ct-channel", "modelopt", "modelopt-config"])
def test_prequantized_checkpoint_matches_its_dequantized_twin(prequantized, kind):
    from safetensors import safe_open

    path = prequantized[kind]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert str(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype()) == "F8_E4M3"
    with LLM(str(path), max_seq_len=128, compilation_cache=False) as llm:
        assert llm.model_config.quantization == "fp8"
        p = _params(llm)
        assert p["layers.0.attn.q"].dtype == jnp.float8_e4m3fn and p["lm_head"].dtype == jnp.float32
        logits = _logits(llm)
        toks = llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    with LLM(str(path) + "-ref", max_seq_len=128, compilation_cache=False) as ref:
        assert ref.model_config.quantization is None
        ref_logits = _logits(ref)
        ref_toks = ref.generate(["The capital of France is"], SamplingParams(max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].token_ids
    assert _rel(logits, ref_logits) < 1e-5
    assert toks == ref_toks
    with pytest.raises(ValueError, match=r"quantization='int8' does not match this checkpoint, which is pre-quantized"):
        LLM(str(path), quantization="int8")


@pytest.mark.parametrize("kind", ["ct-tensor", "modelopt"])
def test_prequantized_checkpoint_with_fused_qkv_matches_it_apart(prequantized, kind, monkeypatch):
    """Fused q/k/v is the default for fp8 weights on a GPU: a pre-quantized checkpoint's q, k and v
    (per-tensor scales here, each its own) fused on load give the logits and tokens of q and k/v apart."""
    path, out = str(prequantized[kind]), {}
    for fused in ("0", "1"):
        monkeypatch.setenv("JAXLLM_FUSED_QKV", fused)
        with LLM(path, max_seq_len=128, compilation_cache=False) as llm:
            assert llm.model_config.fused_qkv == (fused == "1")
            out[fused] = (_logits(llm), llm.generate(["The capital of France is"], SamplingParams(
                max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids)
    assert _rel(out["1"][0], out["0"][0]) < 1e-5
    assert out["1"][1] == out["0"][1]


def test_a_projection_the_checkpoint_left_unquantized_is_quantized_at_load(tmp_path, prequantized):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "partly"
    shutil.copytree(prequantized["ct-channel"], path)
    name = "model.layers.1.mlp.down_proj"
    t = load_file(str(path / "model.safetensors"))
    w = load_file(str(prequantized["ct-channel"]) + "-ref/model.safetensors")[name + ".weight"]
    t[name + ".weight"] = w  # float32, as llm-compressor leaves a module on its ignore list
    del t[name + ".weight_scale"], t[name + ".input_scale"]
    save_file(t, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("re:.*layers[.]1[.]mlp[.]down_proj$")
    (path / "config.json").write_text(json.dumps(cfg))
    with LLM(str(path), max_seq_len=128, compilation_cache=False) as llm:
        p = _params(llm)
    assert p["layers.1.mlp.down"].dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(p["layers.1.mlp.down_scale"], w.abs().amax(dim=1).numpy() / 448.0, rtol=1e-6)


def _checkpoint_with(tmp_path, tiny, config_update=None, files=None) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(tiny, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_update or {})
    (path / "config.json").write_text(json.dumps(cfg))
    for name, content in (files or {}).items():
        (path / name).write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("update,files,found", [  # (NVFP4 loads: test_nvfp4.py)
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}}, None, "ModelOpt quant_algo 'W4A8_AWQ'"),
    (None, {"hf_quant_config.json": {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "MXFP4"}}},
     "ModelOpt quant_algo 'MXFP4' (of ModelOpt's FP4 formats only NVFP4 loads)"),
    ({"quantization_config": {"quant_method": "mxfp4"}}, None, "MXFP4"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 5}}, None, "GPTQ (5-bit"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}}, None, "version 'gemv'"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, None, "quant_method 'bitsandbytes'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, None, "quant_method 'fp8'"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "int", "strategy": "block"}}}}}, None, "format 'int-quantized'"),
])
def test_unsupported_checkpoint_quantization_is_refused_before_loading(tmp_path, tiny, monkeypatch, update, files, found):
    import jaxllm.loader as loader

    path = _checkpoint_with(tmp_path, tiny, update, files)
    monkeypatch.setattr(loader, "place_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError) as info:
        LLM(str(path), compilation_cache=False)
    msg = str(info.value)
    assert found in msg and "supported pre-quantized checkpoints: compressed-tensors FP8" in msg, msg
    assert "ModelOpt FP8" in msg and "LLM(quantization='fp8' or 'int8')" in msg


def test_a_quantized_lm_head_is_refused_naming_it(tmp_path, prequantized):
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path / "qhead"
    shutil.copytree(prequantized["ct-channel"], path)
    t = load_file(str(path / "model.safetensors"))
    w = t["lm_head.weight"]
    t["lm_head.weight"], t["lm_head.weight_scale"] = _fp8(w, w.abs().amax() / 448), torch.tensor([1.0])
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'lm_head.weight' is stored in float8_e4m3fn, but 'lm_head' is not a quantized projection"):
        LLM(str(path), compilation_cache=False)


# -- Orbax ---------------------------------------------------------------------------------------
def test_orbax_round_trip_keeps_the_quantized_weights(tiny, tmp_path):
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    with LLM(str(tiny), max_seq_len=128, compilation_cache=False, quantization="fp8") as llm:
        before, params = llm.generate(["Hello, my name is"], sp, use_tqdm=False)[0].outputs[0].token_ids, _params(llm)
        llm.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "jaxllm.json").read_text())["quantization"] == "fp8"
    with LLM(str(tmp_path / "saved"), max_seq_len=128, compilation_cache=False) as restored:
        assert restored.model_config.quantization == "fp8"
        assert restored.generate(["Hello, my name is"], sp, use_tqdm=False)[0].outputs[0].token_ids == before
        for name, value in _params(restored).items():
            assert value.dtype == params[name].dtype, name
            np.testing.assert_array_equal(np.asarray(value).astype(np.float32), np.asarray(params[name]).astype(np.float32))
    with pytest.raises(ValueError, match=r"quantization='int8' does not match this jaxllm checkpoint, saved with quantization='fp8'"):
        LLM(str(tmp_path / "saved"), quantization="int8", compilation_cache=False)
    # an fp8 save of an older format (format 1: weights [in, out]; 1 and 2: k/v, gate/up not fused) is
    # refused, not misread
    marker = tmp_path / "saved" / "jaxllm.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format_version": 1}))
    with pytest.raises(ValueError, match=r"checkpoint of format 1, saved before .*save it again"):
        LLM(str(tmp_path / "saved"), compilation_cache=False)


# -- tensor parallelism ------------------------------------------------------------------------------
TP_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jax.numpy as jnp, numpy as np
from jaxllm import LLM, SamplingParams
out = {}
for name, path, q in (("int8", sys.argv[1], "int8"), ("fp8", sys.argv[1], "fp8"), ("ct", sys.argv[2], None), ("modelopt", sys.argv[3], None)):
    for tp in (1, 2):
        with LLM(path, tensor_parallel_size=tp, max_seq_len=128, compilation_cache=False, quantization=q) as llm:
            toks = [o.outputs[0].token_ids for o in llm.generate(
                ["The capital of France is", "In 1492, Columbus"], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)]
            logits = np.asarray(llm._engine.runner.hidden_states(jnp.asarray([[1, 504, 3000, 17, 44, 9]], jnp.int32))[1])
            o = llm._engine.runner.params["layers"][0]["attn"]["o"].get_value()
            o_scale = llm._engine.runner.params["layers"][0]["attn"]["o_scale"].get_value()
            out[f"{name}-{tp}"] = dict(tokens=toks, logits=logits.tolist(), dtype=str(o.dtype),
                                       o=[o.nbytes, sorted({s.data.nbytes for s in o.addressable_shards})],
                                       o_scale=np.asarray(o_scale).tolist())
print("RESULT " + json.dumps(out))
"""


def test_tensor_parallel_quantized_matches_one_device(tiny, prequantized):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", TP_SCRIPT, str(tiny), str(prequantized["ct-channel"]), str(prequantized["modelopt"])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    for name in ("int8", "fp8", "ct", "modelopt"):
        one, two = out[f"{name}-1"], out[f"{name}-2"]
        assert two["tokens"] == one["tokens"], name
        assert _rel(np.asarray(two["logits"]), np.asarray(one["logits"])) < 1e-5, name
        assert two["dtype"] == one["dtype"] == ("int8" if name == "int8" else "float8_e4m3fn")
        assert two["o"] == [one["o"][0], [one["o"][0] // 2]], name  # o is split over heads at tp=2
        # o's contracting dims (heads) are sharded at tp=2: its scales still take the global amax
        np.testing.assert_allclose(two["o_scale"], one["o_scale"], rtol=1e-7)


# -- the real SmolLM2-135M-Instruct --------------------------------------------------------------------
PROMPTS = ["The capital of France is", "Hello, my name is", "The future of AI is", "1, 2, 3, 4,",
           "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def smol_reference(smollm2_path):
    """The unquantized model's greedy 32-token continuations (the teacher-forced sequences)."""
    with LLM(str(smollm2_path), max_seq_len=256, max_batch_size=8, compilation_cache=False) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
        seqs = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]
        ref = _teacher_forced_logits(llm, seqs)
    return seqs, ref


def _teacher_forced_logits(llm, seqs) -> np.ndarray:
    """Logits [prompts, 32, vocab] at the positions that predict the continuation, fed the reference tokens."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = p + c
    logits = np.asarray(llm._engine.runner.hidden_states(jnp.asarray(ids))[1])
    return np.stack([logits[i, len(p) - 1 : len(p) - 1 + len(c)] for i, (p, c) in enumerate(seqs)])


# Measured here (CPU, float32 activations, these 5 prompts fixed before measuring): int8 0.975,
# fp8 0.944 -- 9 of 160 positions differ, every one a near-tie of the unquantized model (top-2
# margin <= 0.51 logits; the median margin is 1.58). float8_e4m3fn keeps 3 mantissa bits (~2.6% RMS
# error per weight) and this 135M model's small layers average little of it away, so fp8 sits just
# under the 0.95 here. A quantization bug (a wrong scale axis, a transposed weight) would
# show as disagreements at confident positions, which the margin check refuses.
# fp8-w8a8 (activations quantized per token too, in these calls of >= 64 tokens): 0.919 (147 of
# 160) on the earlier sessions' machines, 0.900 (144) on an AVX2-only AMD EPYC with the same
# packages (2026-11-28; the earlier tree gives the same there): XLA's CPU float32 sums differ by
# machine and three more near-ties (margins < 0.52) flip. The bars below leave at least two
# positions of such slack under the lower figures (fp8 151 of 160 on both CPUs); the margin check
# is what catches bugs.
MIN_AGREEMENT = {"fp8": 0.93, "int8": 0.95, "fp8-w8a8": 0.88}


@pytest.mark.parametrize("mode", ["fp8", "int8", "fp8-w8a8"])
def test_smollm2_quantized_agrees_with_unquantized_and_answers_paris(smollm2_path, smol_reference, mode):
    seqs, ref = smol_reference
    ref_top = ref.argmax(-1)
    assert np.array_equal(ref_top, np.asarray([c for _, c in seqs]))  # teacher forcing = its greedy run
    with LLM(str(smollm2_path), max_seq_len=256, max_batch_size=8, compilation_cache=False, quantization=mode) as llm:
        got = _teacher_forced_logits(llm, seqs).argmax(-1)
        conv = [{"role": "user", "content": "What is the capital of France?"}]
        out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        assert "Paris" in out.outputs[0].text, out.outputs[0].text
    agreement = float((got == ref_top).mean())
    assert got.shape == (5, 32) and agreement >= MIN_AGREEMENT[mode], agreement
    top2 = np.sort(ref, -1)[..., -2:]
    margins = (top2[..., 1] - top2[..., 0])[got != ref_top]
    assert np.all(margins < 1.0), margins  # only near-ties of the unquantized model flip


@pytest.mark.parametrize("style", ["compressed-tensors", "modelopt"])
def test_checkpoint_kv_cache_scales_reach_an_fp8_pool(prequantized, tmp_path, style):
    """A pre-quantized checkpoint's static KV-cache scales (compressed-tensors ``self_attn.k_scale``,
    ModelOpt ``self_attn.k_proj.k_scale``) become the fp8 pool's per-layer scales; a bf16 / f32 pool
    keeps 1.0; scales for only some layers are refused."""
    import torch
    from safetensors.torch import load_file, save_file

    from jaxllm import KvCacheConfig

    src = prequantized["ct-tensor"]
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    want = [(0.5 + i, 0.25 + i) for i in range(layers)]

    def write(folder, only_first=False):
        shutil.copytree(src, folder)
        tensors = load_file(str(folder / "model.safetensors"))
        for i, (k, v) in enumerate(want[:1] if only_first else want):
            pre = f"model.layers.{i}.self_attn."
            kn, vn = (pre + "k_scale", pre + "v_scale") if style == "compressed-tensors" else (
                pre + "k_proj.k_scale", pre + "v_proj.v_scale")
            tensors[kn], tensors[vn] = torch.tensor([k]), torch.tensor(v)
        save_file(tensors, str(folder / "model.safetensors"))
        return str(folder)

    path = write(tmp_path / "kv")
    kw = dict(max_seq_len=64, max_batch_size=2, compilation_cache=False)
    with LLM(path, kv_cache_config=KvCacheConfig(dtype="fp8"), **kw) as llm:
        assert list(llm._engine.runner.kv_scales) == want
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    with LLM(path, **kw) as llm:
        assert set(llm._engine.runner.kv_scales) == {(1.0, 1.0)}
    with pytest.raises(ValueError, match="KV-cache scales for some layers but not both for layers"):
        LLM(write(tmp_path / "partial", only_first=True), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,x_shape,w_shape,axes,out_axes", [
    ("...e,ef->...f", (256, 4096), (4096, 14336), ("embed", "mlp"), ("mlp",)),
    ("bte,ehd->bthd", (2, 128, 4096), (4096, 32, 128), ("embed", "heads", "head_dim"), ("heads", "head_dim")),
    ("bthd,hde->bte", (2, 128, 32, 128), (32, 128, 4096), ("heads", "head_dim", "embed"), ("embed",)),
])
def test_fp8_w8a8_reaches_cublaslt_fp8_on_gpu(spec, x_shape, w_shape, axes, out_axes):
    """On Hopper the W8A8 dot compiles to cuBLASLt's FP8 GEMM with the K-minor weight as it is
    stored (no transpose of the weight per call), writing its product in bf16 as the activations
    are (scaled after), and the result matches the dequantized product."""
    import jax

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=w_shape).astype(np.float32) * 0.02)
    q, scale = quantize_weight(w, "fp8", axes, out_axes)
    stored = jnp.transpose(q, k_minor_order(axes, out_axes))
    x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
    f = jax.jit(lambda a, b, c: qeinsum(spec, a, b, c, w8a8=True))
    hlo = f.lower(x, stored, scale).compile().as_text()
    assert "cublas$lt$matmul$f8" in hlo, [l for l in hlo.splitlines() if "custom-call" in l or "dot(" in l][:8]
    assert not any("transpose" in l and "f8e4m3fn" in l.lower() for l in hlo.splitlines()), "weight transposed per call"
    calls = [line for line in hlo.splitlines() if "cublas$lt$matmul$f8" in line]
    assert all("bf16[" in line.split("custom-call")[0] for line in calls), calls
    got = np.asarray(f(x, stored, scale), np.float32)
    want = np.einsum(spec, np.asarray(x, np.float32), np.asarray(dequantize_weight(q, scale, axes, out_axes)))
    assert _rel(got, want) < 0.05


@pytest.mark.gpu
def test_raw_fp8_product_in_bf16_reaches_cublaslt_fp8_on_gpu():
    """The gate/up product handed unscaled to pallas.silu_mul_quant (raw=True, bf16 activations)
    comes out of cuBLASLt's FP8 GEMM in bf16 -- the GEMM writes half the bytes of float32 -- and
    matches the float32 product to bf16's precision."""
    import jax

    rng = np.random.default_rng(0)
    axes, out_axes = ("embed", "stack", "mlp"), ("stack", "mlp")
    w = jnp.asarray(rng.normal(size=(4096, 2, 1024)).astype(np.float32) * 0.02)
    q, scale = quantize_weight(w, "fp8", axes, out_axes)
    stored = jnp.transpose(q, k_minor_order(axes, out_axes))
    x = jnp.asarray(rng.normal(size=(256, 4096)), jnp.bfloat16)
    f = jax.jit(lambda a, b, c: qeinsum("...e,esf->...sf", a, b, c, w8a8=True, raw=True))
    hlo = f.lower(x, stored, scale).compile().as_text()
    calls = [line for line in hlo.splitlines() if "cublas$lt$matmul$f8" in line]
    assert calls and all("bf16[" in line.split("custom-call")[0] for line in calls), calls
    got = f(x, stored, scale)
    assert got.raw.dtype == jnp.bfloat16
    want = np.einsum("...e,esf->...sf", np.asarray(x, np.float32), np.asarray(dequantize_weight(q, scale, axes, out_axes)))
    assert _rel(np.asarray(got.value(jnp.float32)), want) < 0.05


def test_fp8_products_come_out_of_the_gemm_in_16_bits(tiny_checkpoints, monkeypatch):
    """fp8-w8a8 in bfloat16: every FP8 x FP8 product leaves the GEMM in bf16 -- q/k/v, o and down
    (scaled after) as the gate/up one for the silu kernel -- half the bytes written and read; with
    JAXLLM_FP8_PRODUCT_F32=1 the scaled ones in float32. The logits stay as close to the unquantized
    float32 model either way."""
    from conftest import w8a8_logits_and_tokens
    from jaxllm import LLM
    from jaxllm.models import quant

    path = tiny_checkpoints["llama3"]
    with LLM(str(path), max_seq_len=256, max_batch_size=8, compilation_cache=False, dtype="float32") as llm:
        exact = np.asarray(llm._engine.runner.hidden_states(
            jnp.asarray(np.arange(3 * 70).reshape(3, 70) % 200 + 3, jnp.int32))[1], np.float32)
    products = []
    real = quant._fp8_product
    monkeypatch.setattr(quant, "_fp8_product",
                        lambda *a: products.append(jnp.dtype(a[7] if len(a) > 7 else jnp.float32).name) or real(*a))
    monkeypatch.setenv("JAXLLM_FUSED_SILU_QUANT", "1")
    errors = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("JAXLLM_FP8_PRODUCT_F32", flag)
        products.clear()
        logits, _ = w8a8_logits_and_tokens(path, "bfloat16", "fused_silu_quant", "1")
        errors[flag] = np.abs(logits - exact).mean()
        # with the switch, only the gate/up product (raw, for the silu kernel) stays in bf16
        assert products and set(products) == ({"float32", "bfloat16"} if flag == "1" else {"bfloat16"}), products
    assert errors["0"] <= 1.1 * errors["1"], errors
