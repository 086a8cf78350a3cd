"""pallas.gemv (decode-sized matmuls) against its jnp reference, in Pallas interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.gemv import gemv, gemv_fits, reference_gemv


@pytest.mark.parametrize("m, k, n, k_minor, dtype, splits", [
    (1, 512, 256, False, jnp.bfloat16, 2),
    (3, 768, 384, False, jnp.float32, 3),
    (2, 512, 256, True, jnp.float8_e4m3fn, 2),
    (16, 256, 128, True, jnp.float8_e4m3fn, 1),
])
def test_gemv_matches_reference(m, k, n, k_minor, dtype, splits):
    kx, kw = jax.random.split(jax.random.key(m + k))
    x = jax.random.normal(kx, (m, k), jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)
    w = jax.random.normal(kw, (n, k) if k_minor else (k, n), jnp.float32).astype(dtype)
    scale = jnp.linspace(0.5, 2.0, n) if k_minor else None
    got = gemv(x, w, scale, k_minor=k_minor, block_n=128, block_k=64, splits=splits, interpret=True)
    want = reference_gemv(x, w, scale, k_minor=k_minor)
    assert got.shape == (m, n) and got.dtype == x.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 10)


def test_gemv_refuses_tilings_that_do_not_fit():
    assert gemv_fits(1, 4096, 14336, 128, 64, 4) and not gemv_fits(17, 4096, 14336, 128, 64, 4)
    assert not gemv_fits(1, 4096, 14300, 128, 64, 4) and not gemv_fits(1, 4000, 14336, 128, 64, 4)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(jnp.ones((1, 4000)), jnp.ones((4000, 256)), block_n=128, block_k=64, splits=4, interpret=True)


@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_a_model_through_gemv_gives_the_same_logits_and_tokens(tiny_checkpoints, monkeypatch, quantization):
    """JAXLLM_GEMV=1: every decode-sized projection of the model (plain, fp8 K-minor, int8) runs
    through pallas.gemv (interpret mode on CPU) and gives the XLA path's logits and tokens;
    JAXLLM_GEMV=small: only the weights of at most SMALL_WEIGHT elements do, with the same result."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.pallas import gemv as gemv_module

    ids = jnp.asarray([[5, 9, 17, 33, 2, 71, 8, 100]], jnp.int32)  # 8 tokens: a decode-sized call
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65]}]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    kw = dict(max_seq_len=64, max_batch_size=2, compilation_cache=False, quantization=quantization, dtype="float32")
    results, real = {}, gemv_module.gemv
    for mode in ("0", "1", "small"):
        monkeypatch.setenv("JAXLLM_GEMV", mode)
        if mode == "small":  # a cap between the tiny model's smallest and largest weight
            sizes = sorted(results["1"][2])
            monkeypatch.setattr(gemv_module, "SMALL_WEIGHT", sizes[len(sizes) // 2])
        calls = []
        monkeypatch.setattr(gemv_module, "gemv", lambda x, w, *a, calls=calls, **k: calls.append(w.size) or real(x, w, *a, **k))
        with LLM(str(tiny_checkpoints["llama3"]), **kw) as llm:
            logits = np.asarray(llm._engine.runner.hidden_states(ids)[1])
            tokens = llm.generate(prompts, sp, use_tqdm=False)[0].outputs[0].token_ids
        results[mode] = (logits, tokens, calls)
    ref, ref_tokens, off_calls = results["0"]
    assert off_calls == [] and len(results["1"][2]) >= 4  # q, k/v, o, gate/up, down: traced through the kernel
    small = results["small"][2]
    assert small and max(small) <= gemv_module.SMALL_WEIGHT < max(results["1"][2])
    for mode in ("1", "small"):
        got, got_tokens, _ = results[mode]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert got_tokens == ref_tokens


def test_gemv_mode_is_checked(monkeypatch):
    from jaxllm.pallas.gemv import gemv_wanted

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    for value, mode in (("0", ""), ("1", "all"), ("small", "small")):
        monkeypatch.setenv("JAXLLM_GEMV", value)
        assert gemv_wanted(mesh) == mode
    monkeypatch.setenv("JAXLLM_GEMV", "yes")
    with pytest.raises(ValueError, match="JAXLLM_GEMV='yes'"):
        gemv_wanted(mesh)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, k_minor, dtype", [
    (4096, 14336, False, jnp.bfloat16),  # a tp=2 shard's gate/up
    (7168, 4096, False, jnp.bfloat16),  # its down
    (4096, 28672, True, jnp.float8_e4m3fn),  # fp8 gate/up, stored [N, K]
])
@pytest.mark.parametrize("m", [1, 4])
def test_gemv_compiled_on_the_gpu_matches_reference(m, k, n, k_minor, dtype):
    from jaxllm.pallas.gemv import gemv_tiling

    kx, kw = jax.random.split(jax.random.key(k + n + m))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, (n, k) if k_minor else (k, n), jnp.float32)).astype(dtype)
    scale = jnp.full((n,), 0.5, jnp.float32) if k_minor else None
    got = gemv(x, w, scale, k_minor=k_minor, **gemv_tiling(m, k, n))
    want = reference_gemv(x, w, scale, k_minor=k_minor)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
