"""pallas.add_norm (a decode call's residual add + RMSNorm in one kernel) against its jnp reference
and in the model, in Pallas interpret mode; compiled on the GPU (gpu-marked)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.add_norm import add_rmsnorm, add_rmsnorm_fits, reference_add_rmsnorm


def _inputs(rows, e, dtype, y_dtype, seed=0):
    kx, ky, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (rows, e), jnp.float32).astype(dtype)
    y = (3 * jax.random.normal(ky, (rows, e), jnp.float32)).astype(y_dtype)
    w = (1 + 0.1 * jax.random.normal(kw, (e,), jnp.float32)).astype(dtype)
    return x, y, w


@pytest.mark.parametrize("rows, e, dtype, y_dtype", [
    (1, 256, jnp.bfloat16, jnp.bfloat16),
    (4, 512, jnp.bfloat16, jnp.float32),  # a float32 y is rounded to x's dtype before the add, as x + y does
    (16, 64, jnp.float32, jnp.float32),
])
def test_add_rmsnorm_matches_reference(rows, e, dtype, y_dtype):
    x, y, w = _inputs(rows, e, dtype, y_dtype)
    h, n = add_rmsnorm(x, y, w, eps=1e-5, interpret=True)
    rh, rn = reference_add_rmsnorm(x, y, w, 1e-5)
    assert h.dtype == n.dtype == dtype and h.shape == n.shape == (rows, e)
    assert (h == rh).all()  # the add rounds exactly as x + y
    # the sum of squares is added in another order than XLA's: at most a last-bit difference
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(rn, np.float32), rtol=1e-2 if dtype == jnp.bfloat16
                               else 1e-6, atol=1e-6)


@pytest.mark.parametrize("rows, dtype", [(1, jnp.bfloat16), (3, jnp.float32)])
def test_add_rmsnorm_adds_split_k_partials(rows, dtype):
    """y [S, rows, e]: a split-K projection's float32 partial sums, added in the kernel (float32,
    then rounded to x's dtype as the projection's own epilogue would) -- one kernel fewer."""
    x, _, w = _inputs(rows, 256, dtype, jnp.float32)
    parts = jax.random.normal(jax.random.key(5), (4, rows, 256), jnp.float32)
    h, n = add_rmsnorm(x, parts, w, eps=1e-5, interpret=True)
    rh, rn = reference_add_rmsnorm(x, jnp.sum(parts, axis=0), w, 1e-5)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(rh, np.float32), rtol=1e-2 if dtype == jnp.bfloat16
                               else 1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(rn, np.float32), rtol=1e-2 if dtype == jnp.bfloat16
                               else 1e-5, atol=1e-5)
    one, _ = add_rmsnorm(x, parts[0], w, eps=1e-5, interpret=True)  # not just the first partial
    assert not np.allclose(np.asarray(one, np.float32), np.asarray(h, np.float32))
    with pytest.raises(ValueError, match=r"expected \[rows, e\], \[\(S,\) rows, e\]"):
        add_rmsnorm(x, parts[:, :, :128], w, eps=1e-5, interpret=True)


def test_add_rmsnorm_refuses_shapes_it_does_not_serve():
    assert add_rmsnorm_fits(1, 4096) and add_rmsnorm_fits(16, 64)
    assert not add_rmsnorm_fits(17, 4096) and not add_rmsnorm_fits(1, 576) and not add_rmsnorm_fits(1, 32)
    with pytest.raises(ValueError, match="rows <= 16 and e a power of two"):
        add_rmsnorm(jnp.ones((1, 576)), jnp.ones((1, 576)), jnp.ones(576), eps=1e-5, interpret=True)


def test_fused_norm_by_default_on_gpus(monkeypatch):
    """JAXLLM_FUSED_NORM=auto (the default): on a (stand-in) GPU mesh of any size, not on CPUs or
    without a mesh (1 / 0 and bad values: test_fused_qkv.py, test_loader_switches_force_and_refuse)."""
    from conftest import stand_in_mesh as mesh
    from jaxllm.loader import fused_norm_wanted

    monkeypatch.delenv("JAXLLM_FUSED_NORM", raising=False)
    assert fused_norm_wanted(mesh(1)) and fused_norm_wanted(mesh(2))
    assert not fused_norm_wanted(mesh(1, "cpu")) and not fused_norm_wanted(None)


def _unfused_and_fused(monkeypatch, path, prompts=2, **llm_kw):
    """{JAXLLM_FUSED_NORM value: (logits of an 8-token call, greedy tokens, shapes of the kernel's
    calls, layers)} of one model without and with the fused residual add + RMSNorm, generating for
    one or two prompts at once."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.pallas import add_norm as add_norm_module

    ids = jnp.asarray([[5, 9, 17, 33, 2, 71, 8, 100]], jnp.int32)  # 8 tokens: a decode-sized call
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65]}, {"prompt_token_ids": [7, 7, 1]}][:prompts]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    results, real = {}, add_norm_module.add_rmsnorm
    for fused in ("0", "1"):
        monkeypatch.setenv("JAXLLM_FUSED_NORM", fused)
        calls = []  # (x's shape, y's shape) of each traced call
        monkeypatch.setattr(add_norm_module, "add_rmsnorm",
                            lambda *a, calls=calls, **k: calls.append((a[0].shape, a[1].shape)) or real(*a, **k))
        with LLM(str(path), max_seq_len=64, max_batch_size=2, compilation_cache=False, **llm_kw) as llm:
            layers = llm.model_config.num_layers
            logits = np.asarray(llm._engine.runner.hidden_states(ids)[1])
            tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        results[fused] = (logits, tokens, calls, layers)
    return results


@pytest.mark.parametrize("variant", ["llama3", "qwen3"])
def test_a_model_with_the_fused_norm_gives_the_same_logits_and_tokens(tiny_checkpoints, monkeypatch, variant):
    """JAXLLM_FUSED_NORM=1: every decode-sized residual add + RMSNorm (two per layer and the final
    norm) through the kernel, with the unfused model's logits and greedy tokens."""
    results = _unfused_and_fused(monkeypatch, tiny_checkpoints[variant])
    (ref, ref_tokens, off_calls, _), (got, got_tokens, on_calls, layers) = results["0"], results["1"]
    assert off_calls == []
    # per traced program: 2 per layer but the first layer's input norm (nothing to add), + the final norm;
    # the layers after the first share one trace
    assert len(on_calls) >= 2 * min(layers, 2), on_calls
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert got_tokens == ref_tokens


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("e", [4096, 8192])
def test_add_rmsnorm_compiled_on_the_gpu_matches_reference(rows, e):
    x, y, w = _inputs(rows, e, jnp.bfloat16, jnp.float32, seed=e + rows)
    h, n = add_rmsnorm(x, y, w, eps=1e-5)
    rh, rn = reference_add_rmsnorm(x, y, w, 1e-5)
    assert (h == rh).all()
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(rn, np.float32), rtol=1e-2, atol=1e-6)


@pytest.mark.gpu
def test_add_rmsnorm_with_split_k_partials_compiled_on_the_gpu():
    """y [4, 1, 4096]: an fp8 down projection's partial sums at batch 1, added by the compiled kernel."""
    x, _, w = _inputs(1, 4096, jnp.bfloat16, jnp.float32, seed=11)
    parts = jax.random.normal(jax.random.key(12), (4, 1, 4096), jnp.float32)
    h, n = add_rmsnorm(x, parts, w, eps=1e-5)
    rh, rn = reference_add_rmsnorm(x, parts, w, 1e-5)
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(rh, np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(rn, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_a_model_with_the_fused_norm_compiled_on_the_gpu(tmp_path, monkeypatch):
    """The kernel compiled by Triton inside a model's step programs (hidden size 256, float32): the
    unfused model's logits and greedy tokens."""
    from conftest import write_kernel_sized_config

    results = _unfused_and_fused(monkeypatch, write_kernel_sized_config(tmp_path / "m"), load_format="dummy",
                                 dtype="float32")
    assert results["1"][2]  # the kernel ran
    np.testing.assert_allclose(results["1"][0], results["0"][0], rtol=1e-4, atol=1e-4)
    assert results["1"][1] == results["0"][1]


@pytest.mark.parametrize("variant, quantization", [("llama3", "fp8"), ("llama3", None), ("qwen2", "fp8")])
def test_split_k_projections_hand_their_partials_to_the_fused_norm(tiny_checkpoints, monkeypatch, variant,
                                                                   quantization):
    """Batch 1: with the o and down projections through gemv at one row (JAXLLM_GEMV=1) and K split in two
    (forced here: the tiny model's K is too short for the default tiling to split), their float32
    partial sums go straight into pallas.add_norm (no epilogue kernel): the unfused model's logits
    and tokens."""
    from jaxllm.pallas import gemv as gemv_module

    real_tiling = gemv_module.gemv_tiling

    def split_in_two(m, k, n, *a, **kw):
        t = real_tiling(m, k, n, *a, **kw)
        return dict(t, block_k=16, splits=2) if t is not None and m == 1 and k % 32 == 0 else t

    monkeypatch.setattr(gemv_module, "gemv_tiling", split_in_two)
    monkeypatch.setenv("JAXLLM_GEMV", "1")
    # the tiling is read while tracing: the shared layer's jit cache must neither serve this test
    # programs traced with the real one nor keep the forced ones for later tests
    jax.clear_caches()
    try:
        results = _unfused_and_fused(monkeypatch, tiny_checkpoints[variant], prompts=1, quantization=quantization)
    finally:
        jax.clear_caches()
    (ref, ref_tokens, _, _), (got, got_tokens, on_calls, _) = results["0"], results["1"]
    partial_calls = [y for x, y in on_calls if len(y) == 3]
    assert partial_calls and all(y[0] == 2 for y in partial_calls)  # [2 splits, rows, e]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert got_tokens == ref_tokens
