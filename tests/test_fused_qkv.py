"""q, k and v as one projection (models/llama.py: fuse_qkv): the same function as q and k/v apart,
for every architecture switch (q/k/v biases, q/k norms, tied embeddings, sliding window) and
quantization mode; an Orbax save holds the canonical q and kv again."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import VARIANTS
from jaxllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Hello, my name is", "A"]


def _run(path, monkeypatch, fused: bool, **kw):
    monkeypatch.setenv("JAXLLM_FUSED_QKV", "1" if fused else "0")
    with LLM(str(path), max_seq_len=128, compilation_cache=False, dtype="float32", **kw) as llm:
        attn = {p[-1]: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(llm._engine.runner.params)
                if p[:3] == ("layers", 0, "attn")}
        ids = llm.tokenizer.encode("In 1492, Columbus sailed across the Atlantic Ocean")
        logits = np.asarray(llm._engine.runner.hidden_states(jnp.asarray([ids], jnp.int32))[1])
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        return llm.model_config, attn, logits, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_qkv_computes_what_q_and_kv_apart_do(tiny_checkpoints, monkeypatch, variant):
    cfg, attn, logits, tokens = _run(tiny_checkpoints[variant], monkeypatch, fused=True)
    ref_cfg, ref_attn, ref_logits, ref_tokens = _run(tiny_checkpoints[variant], monkeypatch, fused=False)
    assert cfg.fused_qkv and not ref_cfg.fused_qkv
    assert "q" not in attn and "kv" not in attn and {"q", "kv"} <= set(ref_attn)
    g = cfg.num_heads // cfg.num_kv_heads
    e, d = cfg.hidden_size, cfg.head_dim
    assert attn["qkv"].shape == (e, cfg.num_kv_heads, g + 2, d)
    # per KV head: its query heads, then k, then v (the loaded HF weights, rearranged only)
    q = np.asarray(ref_attn["q"]).reshape(e, cfg.num_kv_heads, g, d)
    np.testing.assert_array_equal(np.asarray(attn["qkv"]), np.concatenate([q, np.asarray(ref_attn["kv"])], axis=2))
    if cfg.attention_bias:  # qwen2
        assert attn["qkv_bias"].shape == (cfg.num_kv_heads, g + 2, d)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_fused_qkv_of_quantized_weights(tiny_checkpoints, monkeypatch, mode):
    """fp8 weights are stored K-minor ([out..., in...]) and every projection has per-channel
    scales: both fuse along the same stack axis."""
    path = tiny_checkpoints["llama3"]
    cfg, attn, logits, tokens = _run(path, monkeypatch, fused=True, quantization=mode)
    _, ref_attn, ref_logits, ref_tokens = _run(path, monkeypatch, fused=False, quantization=mode)
    kvh, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    assert attn["qkv_scale"].shape == (kvh, g + 2, d)
    assert attn["qkv"].shape == ((kvh, g + 2, d, cfg.hidden_size) if mode == "fp8" else (cfg.hidden_size, kvh, g + 2, d))
    np.testing.assert_array_equal(
        np.asarray(attn["qkv_scale"]),
        np.concatenate([np.asarray(ref_attn["q_scale"]).reshape(kvh, g, d), np.asarray(ref_attn["kv_scale"])], axis=1))
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)


def test_saves_hold_q_and_kv_apart_and_restore_fused_or_not(tiny_checkpoints, monkeypatch, tmp_path):
    """An Orbax checkpoint saved from a fused model holds q and kv (the layout every tensor-parallel
    size can restore); restored fused or apart, it gives the saved model's outputs."""
    import orbax.checkpoint as ocp

    path = tmp_path / "ckpt"
    monkeypatch.setenv("JAXLLM_FUSED_QKV", "1")
    with LLM(str(tiny_checkpoints["qwen2"]), max_seq_len=128, compilation_cache=False) as llm:
        assert llm.model_config.fused_qkv
        want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True),
                                                             use_tqdm=False)]
        llm.save(path)
    assert json.loads((path / "jaxllm.json").read_text())["format_version"] == 4
    saved = ocp.StandardCheckpointer().metadata(path / "params")
    tree = getattr(saved, "item_metadata", saved)
    attn = tree["layers"]["0"]["attn"] if "0" in tree["layers"] else tree["layers"][0]["attn"]
    assert {"q", "kv", "q_bias", "kv_bias"} <= set(attn) and "qkv" not in attn and "qkv_bias" not in attn
    for fused in (True, False):
        monkeypatch.setenv("JAXLLM_FUSED_QKV", "1" if fused else "0")
        with LLM(str(path), max_seq_len=128, compilation_cache=False) as llm:
            assert llm.model_config.fused_qkv == fused
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True),
                                                                use_tqdm=False)]
        assert got == want, fused


def test_fused_qkv_by_default_under_tensor_parallelism_or_fp8_on_gpus(monkeypatch):
    """JAXLLM_FUSED_QKV=auto (the default): fused on a (stand-in) GPU mesh split over several
    devices -- each shard's q and k/v one gemv, faster at tp=2 -- and on one GPU for fp8 weights
    (one gemv at batch 1; no per-call weight concatenation in fp8-w8a8's merged FP8 dots); apart on
    one GPU for bf16 / int8 (fusion cost bf16 throughput there) and on CPUs (1 / 0:
    test_loader_switches_force_and_refuse)."""
    from conftest import stand_in_mesh as mesh
    from jaxllm.loader import fused_qkv_wanted

    monkeypatch.delenv("JAXLLM_FUSED_QKV", raising=False)
    assert fused_qkv_wanted(mesh(2)) and fused_qkv_wanted(mesh(4)) and fused_qkv_wanted(mesh(2), "int8")
    assert fused_qkv_wanted(mesh(1), "fp8")
    assert not fused_qkv_wanted(mesh(1)) and not fused_qkv_wanted(mesh(1), "int8")
    assert not fused_qkv_wanted(mesh(2, "cpu")) and not fused_qkv_wanted(mesh(1, "cpu"), "fp8")
    assert not fused_qkv_wanted(None) and not fused_qkv_wanted(None, "fp8")


@pytest.mark.parametrize("name", ["JAXLLM_FUSED_QKV", "JAXLLM_FUSED_NORM", "JAXLLM_FUSED_SILU_QUANT",
                                  "JAXLLM_FUSED_NORM_QUANT"])
def test_loader_switches_force_and_refuse(monkeypatch, name):
    """The loader's auto / 1 / 0 switches: 1 forces the fusion on a CPU mesh, 0 keeps it off on a
    GPU mesh where auto would take it; other values are errors naming the switch and its values."""
    from conftest import stand_in_mesh as mesh
    from jaxllm.loader import fused_norm_quant_wanted, fused_norm_wanted, fused_qkv_wanted, fused_silu_quant_wanted

    wanted = {"JAXLLM_FUSED_QKV": fused_qkv_wanted, "JAXLLM_FUSED_NORM": fused_norm_wanted,
              "JAXLLM_FUSED_SILU_QUANT": fused_silu_quant_wanted, "JAXLLM_FUSED_NORM_QUANT": fused_norm_quant_wanted}[name]
    monkeypatch.delenv(name, raising=False)
    assert not wanted(mesh(1, "cpu"))  # auto: never on CPUs
    monkeypatch.setenv(name, "1")
    assert wanted(mesh(1, "cpu"))
    monkeypatch.setenv(name, "0")
    assert not wanted(mesh(2))
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}='yes': expected auto, 0 or 1"):
        wanted(mesh(2))
