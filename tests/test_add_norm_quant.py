"""pallas.add_norm.add_rmsnorm_quant: fp8-w8a8's residual add, RMSNorm and per-token FP8
quantization of a projection's input in one kernel -- against its jnp reference (Pallas interpret
mode on CPU, compiled on a GPU), and in the model (JAXLLM_FUSED_NORM_QUANT=1) against XLA's path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.add_norm import add_rmsnorm_quant, reference_add_rmsnorm_quant


def _inputs(rows, e, dtype, seed=0):
    k = jax.random.key(seed)
    x = 3.0 * jax.random.normal(k, (rows, e), dtype)
    y = jax.random.normal(jax.random.fold_in(k, 1), (rows, e), dtype)
    w = 1.0 + 0.2 * jax.random.normal(jax.random.fold_in(k, 2), (e,), dtype)
    return x, y, w


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rows, e, add", [(3, 256, True), (70, 128, True), (5, 512, False)])
def test_kernel_matches_reference(rows, e, add, dtype):
    x, y, w = _inputs(rows, e, dtype, seed=rows + e)
    y = y if add else None
    h, q, s = add_rmsnorm_quant(x, y, w, eps=1e-5, interpret=True)
    rh, rq, rs = reference_add_rmsnorm_quant(x, y, w, 1e-5)
    assert h.dtype == x.dtype and q.dtype == jnp.float8_e4m3fn and q.shape == (rows, e) and s.shape == (rows,)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(rh, np.float32))
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
    assert (np.asarray(q, np.float32) != np.asarray(rq, np.float32)).mean() < 1e-3  # an fp8 step at a tie at most
    # q * scale is the norm to fp8's precision; each row's largest value maps to 448
    hf = np.asarray(h if add else x, np.float32)
    n = hf / np.sqrt((hf * hf).mean(-1, keepdims=True) + 1e-5) * np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(q, np.float32) * np.asarray(s)[:, None], n, rtol=0.07,
                               atol=np.abs(n).max() * 2 ** -8)
    assert np.allclose(np.abs(np.asarray(q, np.float32)).max(axis=1), 448.0)


def test_shapes_it_does_not_serve_are_refused():
    x, y, w = _inputs(2, 96, jnp.float32)
    with pytest.raises(ValueError, match="add_rmsnorm_quant.*power of two"):
        add_rmsnorm_quant(x, y, w, eps=1e-5, interpret=True)
    x, y, w = _inputs(2, 128, jnp.float32)
    with pytest.raises(ValueError, match="add_rmsnorm_quant"):
        add_rmsnorm_quant(x, y[:1], w, eps=1e-5, interpret=True)


def _w8a8_model(path, monkeypatch, flag, dtype):
    """(logits of a 3 x 70-token call, greedy tokens of 4 prompts, the kernel's calls) under
    fp8-w8a8 with JAXLLM_FUSED_NORM_QUANT=flag."""
    from conftest import w8a8_logits_and_tokens
    from jaxllm.pallas import add_norm as module

    calls = []  # (the module's own function, not an earlier call's wrapper)
    monkeypatch.setattr(module, "add_rmsnorm_quant",
                        lambda x, y, *a, **kw: calls.append((x.shape, y is None)) or add_rmsnorm_quant(x, y, *a, **kw))
    monkeypatch.setenv("JAXLLM_FUSED_NORM_QUANT", flag)
    return (*w8a8_logits_and_tokens(path, dtype, "fused_norm_quant", flag), calls)


@pytest.mark.parametrize("silu", ["0", "1"])
def test_model_with_the_kernel_matches_xla_path(tiny_checkpoints, monkeypatch, silu):
    """float32 activations: the kernel serves every FP8 x FP8 projection input of >= 64 tokens (the
    first layer's norm without an add too), not decode-sized calls, and the logits and tokens are
    XLA's path's (the sum of squares' order may move an fp8 rounding at a tie: close, not equal);
    also with the MLP's gate/up product handed on unscaled to pallas.silu_mul_quant (`silu`)."""
    monkeypatch.setenv("JAXLLM_FUSED_SILU_QUANT", silu)
    path = tiny_checkpoints["llama3"]
    ref, ref_tokens, off_calls = _w8a8_model(path, monkeypatch, "0", "float32")
    got, tokens, on_calls = _w8a8_model(path, monkeypatch, "1", "float32")
    assert off_calls == [] and on_calls and all(shape[0] >= 64 for shape, _ in on_calls), on_calls
    assert any(first for _, first in on_calls) and not all(first for _, first in on_calls)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert tokens == ref_tokens


def test_fused_norm_quant_is_off_by_default(monkeypatch):
    """JAXLLM_FUSED_NORM_QUANT=auto (the default) keeps it off until measured on a GPU (1 / 0 and bad
    values: test_fused_qkv.py's shared switch test)."""
    from conftest import stand_in_mesh as mesh
    from jaxllm.loader import fused_norm_quant_wanted

    monkeypatch.delenv("JAXLLM_FUSED_NORM_QUANT", raising=False)
    assert not fused_norm_quant_wanted(mesh(1)) and not fused_norm_quant_wanted(mesh(1, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 1024, 8192])
def test_kernel_compiled_on_the_gpu_matches_reference(rows):
    """Llama-3.1-8B's width (4096), bf16, at decode and prefill row counts."""
    x, y, w = _inputs(rows, 4096, jnp.bfloat16, seed=rows)
    h, q, s = add_rmsnorm_quant(x, y, w, eps=1e-5)
    rh, rq, rs = reference_add_rmsnorm_quant(x, y, w, 1e-5)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(rh, np.float32))
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-5)
    a, b = np.asarray(q, np.float32), np.asarray(rq, np.float32)
    assert (a != b).mean() < 1e-3
