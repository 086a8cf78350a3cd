"""pallas.silu_mul_quant: an fp8-w8a8 MLP's gate/up scaling, silu(gate) * up and per-token FP8
quantization in one kernel -- against its jnp reference (Pallas interpret mode on CPU, compiled on
a GPU), and in the model (JAXLLM_FUSED_SILU_QUANT=1) against XLA's path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.silu_mul_quant import block_for, reference_silu_mul_quant, silu_mul_quant


def _inputs(m, f, seed=0):
    k = jax.random.key(seed)
    y = 30.0 * jax.random.normal(k, (m, 2 * f), jnp.float32)
    x_scale = 0.01 + 0.1 * jax.random.uniform(jax.random.fold_in(k, 1), (m,))
    w_scale = 0.001 + 0.05 * jax.random.uniform(jax.random.fold_in(k, 2), (2 * f,))
    return y, x_scale, w_scale


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("m, f", [(1, 128), (5, 384), (3, 2048 * 3)])
def test_kernel_matches_reference(m, f, unroll):
    y, xs, ws = _inputs(m, f, seed=m + f)
    h, s = silu_mul_quant(y, xs, ws, unroll=unroll, interpret=True)
    rh, rs = reference_silu_mul_quant(y, xs, ws)
    assert h.dtype == jnp.float8_e4m3fn and h.shape == (m, f) and s.shape == (m,)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)), np.asarray(rh.astype(jnp.float32)))
    # h * scale is silu(gate) * up to fp8's precision, and each row's largest value maps to 448
    hf = np.asarray(h.astype(jnp.float32)) * np.asarray(s)[:, None]
    g, u = np.split(np.asarray(y * xs[:, None] * ws[None, :]), 2, axis=1)
    want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(hf, want, rtol=0.07, atol=np.abs(want).max() * 2 ** -9)
    assert np.allclose(np.abs(np.asarray(h.astype(jnp.float32))).max(axis=1), 448.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernel_reads_a_16_bit_product(dtype):
    """The model hands the kernel a bf16 gate/up product where its activations are bf16 (half the
    bytes of float32): read as it is, computed in float32 -- the reference on the same values."""
    y, xs, ws = _inputs(4, 384, seed=7)
    y16 = y.astype(dtype)
    h, s = silu_mul_quant(y16, xs, ws, interpret=True)
    rh, rs = reference_silu_mul_quant(y16.astype(jnp.float32), xs, ws)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)), np.asarray(rh.astype(jnp.float32)))


@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("m, f", [(4, 384), (8, 2048 * 3)])
def test_several_rows_a_program_give_the_one_row_result(m, f, rows):
    """rows=R: each program quantizes R rows (sharing each w_scale block's load), each row with its
    own scale -- bit for bit the reference, on a bf16 product as the model hands it."""
    y, xs, ws = _inputs(m, f, seed=3 * m + f)
    y16 = y.astype(jnp.bfloat16)
    y16 = y16.at[1].multiply(0.01)  # rows of very different ranges: the scales are per row, not per program
    h, s = silu_mul_quant(y16, xs, ws, rows=rows, interpret=True)
    rh, rs = reference_silu_mul_quant(y16.astype(jnp.float32), xs, ws)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
    np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)), np.asarray(rh.astype(jnp.float32)))
    assert float(rs[1]) < 0.1 * float(rs[0])


def test_rows_a_program_switch(monkeypatch):
    """JAXLLM_SILU_ROWS (A/B, default 1): taken where it divides the rows and the row is unrolled,
    else 1; anything but a power of two to 16 is refused naming the switch. The kernel refuses rows
    it cannot serve."""
    from jaxllm.pallas.silu_mul_quant import rows_for

    monkeypatch.delenv("JAXLLM_SILU_ROWS", raising=False)
    assert rows_for(1024, 14336) == 1
    monkeypatch.setenv("JAXLLM_SILU_ROWS", "4")
    assert [rows_for(m, 14336) for m in (1024, 8192, 6, 1)] == [4, 4, 1, 1]
    assert rows_for(1024, 2048 * 17) == 1  # 17 blocks: looped, one row a program
    for bad in ("3", "0", "32", "two"):
        monkeypatch.setenv("JAXLLM_SILU_ROWS", bad)
        with pytest.raises(ValueError, match=f"JAXLLM_SILU_ROWS='{bad}': expected a power of two"):
            rows_for(1024, 14336)
    y, xs, ws = _inputs(6, 128)
    for rows, unroll in ((4, True), (3, True), (2, False)):
        with pytest.raises(ValueError, match=f"rows={rows} must be a power of two dividing M=6"):
            silu_mul_quant(y, xs, ws, rows=rows, unroll=unroll, interpret=True)


def test_shapes_it_does_not_serve_are_refused():
    assert block_for(14336) == 2048 and block_for(1536) == 512 and block_for(100) is None
    y, xs, ws = _inputs(2, 100)
    with pytest.raises(ValueError, match="silu_mul_quant.*F a multiple of 128"):
        silu_mul_quant(y, xs, ws, interpret=True)
    y, xs, ws = _inputs(2, 128)
    with pytest.raises(ValueError, match="silu_mul_quant"):
        silu_mul_quant(y, xs[:1], ws, interpret=True)


def test_fused_silu_quant_by_default_on_gpus(monkeypatch):
    """JAXLLM_FUSED_SILU_QUANT=auto (the default): on a (stand-in) GPU mesh, where the Pallas Triton
    backend exists; not on CPUs or without a mesh (1 / 0 and bad values: test_fused_qkv.py)."""
    from conftest import stand_in_mesh as mesh
    from jaxllm.loader import fused_silu_quant_wanted
    from jaxllm.pallas import gemv

    monkeypatch.delenv("JAXLLM_FUSED_SILU_QUANT", raising=False)
    assert fused_silu_quant_wanted(mesh(1)) and fused_silu_quant_wanted(mesh(2))
    assert not fused_silu_quant_wanted(mesh(1, "cpu")) and not fused_silu_quant_wanted(None)
    monkeypatch.setattr(gemv, "triton_available", lambda: False)
    assert not fused_silu_quant_wanted(mesh(1))  # XLA's path where the kernel's backend is gone


def _w8a8_model(path, monkeypatch, flag, dtype):
    """(logits of a 3 x 70-token call, greedy tokens of 4 prompts, the kernel's calls) of the model
    under fp8-w8a8 with JAXLLM_FUSED_SILU_QUANT=flag."""
    from conftest import w8a8_logits_and_tokens
    from jaxllm.pallas import silu_mul_quant as module

    calls = []
    monkeypatch.setattr(module, "silu_mul_quant", lambda y, *a, **kw: calls.append((*y.shape, y.dtype.name)) or silu_mul_quant(y, *a, **kw))
    monkeypatch.setenv("JAXLLM_FUSED_SILU_QUANT", flag)
    return (*w8a8_logits_and_tokens(path, dtype, "fused_silu_quant", flag), calls)


def test_model_with_the_kernel_matches_xla_path(tiny_checkpoints, monkeypatch):
    """float32 activations: the same logits and tokens with the kernel as without (the tiny model's
    intermediate size, 128, is one block); the kernel serves every FP8 x FP8 MLP call."""
    path = tiny_checkpoints["llama3"]
    ref, ref_tokens, off_calls = _w8a8_model(path, monkeypatch, "0", "float32")
    got, tokens, on_calls = _w8a8_model(path, monkeypatch, "1", "float32")
    assert off_calls == [] and on_calls and all(s[1] == 256 and s[0] >= 64 and s[2] == "float32" for s in on_calls), on_calls
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert tokens == ref_tokens


def test_model_with_the_kernel_is_as_close_to_unquantized_in_bf16(tiny_checkpoints, monkeypatch):
    """bfloat16: the gate/up GEMM hands the kernel its unscaled product in bf16, and the kernel keeps
    silu(gate) * up in float32 where XLA's path rounds the scaled product to bf16, so bits differ;
    both stay as close to the unquantized float32 model."""
    from jaxllm import LLM

    path = tiny_checkpoints["llama3"]
    with LLM(str(path), max_seq_len=256, max_batch_size=8, compilation_cache=False, dtype="float32") as llm:
        exact = np.asarray(llm._engine.runner.hidden_states(
            jnp.asarray(np.arange(3 * 70).reshape(3, 70) % 200 + 3, jnp.int32))[1], np.float32)
    xla = np.abs(_w8a8_model(path, monkeypatch, "0", "bfloat16")[0] - exact).mean()
    logits, _, calls = _w8a8_model(path, monkeypatch, "1", "bfloat16")
    kernel = np.abs(logits - exact).mean()
    assert calls and all(c[2] == "bfloat16" for c in calls), calls  # the GEMM's product, unscaled, in bf16
    assert kernel <= 1.05 * xla, (kernel, xla)


@pytest.mark.gpu
@pytest.mark.parametrize("unroll, rows", [(True, 1), (False, 1), (True, 2), (True, 4)])
@pytest.mark.parametrize("m", [64, 256])
def test_kernel_compiled_on_the_gpu_matches_reference(m, unroll, rows):
    """Llama-3.1-8B's MLP (F = 14336) at 64 and 256 tokens: Triton's sigmoid and division may differ
    from XLA's in the last bit, so a few values may land one fp8 step apart."""
    y, xs, ws = _inputs(m, 14336, seed=m)
    h, s = silu_mul_quant(y, xs, ws, unroll=unroll, rows=rows)
    rh, rs = reference_silu_mul_quant(y, xs, ws)
    np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-5)
    a, b = np.asarray(h.astype(jnp.float32)), np.asarray(rh.astype(jnp.float32))
    assert (a != b).mean() < 1e-3
    np.testing.assert_allclose(a, b, rtol=0.07, atol=2 ** -9)
