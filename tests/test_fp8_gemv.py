"""The Pallas weight-only fp8 GEMV (decode-sized projections reading the fp8 bytes) against its jnp
reference: on CPU through the Mosaic GPU interpreter and Mosaic's own CUDA lowering, on an H100 in
the `gpu` suite (run through the device tool); and the models' use of it."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import write_kernel_sized_config
from jaxllm.pallas.fp8_gemv import fp8_gemv, gemv_supported, reference_fp8_gemv

TOL = 2e-2  # bf16 output vs the float32 reference, relative L2 error


def _interpret():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams()


def _inputs(seed, m, n, k):
    """x [M, K] bf16, an fp8 weight [N, K] spread over e4m3's range, per-channel scales."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(np.clip(rng.standard_normal((n, k)) * 60, -448, 448), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
    return x, w, scale


def _rel_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


CPU_GRID = [  # (M, N, K, kernel kwargs)
    (1, 128, 512, {}),  # batch 1, default split
    (5, 64, 256, {"num_splits": 1}),  # one program, rows padded to 8
    (16, 192, 1024, {"block_k": 128, "num_splits": 3, "max_concurrent_steps": 2}),  # ring refills
    (64, 128, 768, {"num_splits": 2}),  # the most rows; K not a multiple of the splits' steps
    (3, 64, 1280, {"block_k": 256, "num_splits": 2, "max_concurrent_steps": 1}),  # one stage
]


@pytest.mark.parametrize("case", CPU_GRID, ids=lambda c: "m{}n{}k{}".format(*c[:3]))
def test_kernel_matches_reference_in_interpret_mode(case):
    m, n, k, kw = case
    x, w, scale = _inputs(m * n + k, m, n, k)
    got = fp8_gemv(x, w, scale, interpret=_interpret(), **kw)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert _rel_err(got, reference_fp8_gemv(x, w, scale)) <= TOL


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1, 14336, 4096), (1, 4096, 14336), (8, 1024, 4096),
                                   (64, 4096, 4096)])
def test_kernel_lowers_for_cuda_at_8b_shapes(m, n, k):
    """Mosaic GPU's own lowering (layouts, TMA tiling, the shared-memory budget, the fp8 -> f16
    conversion) runs on CPU too: the Llama-3.1-8B projections must lower for an NVIDIA GPU."""
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((n,), jnp.float32))
    text = jax.jit(fp8_gemv).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "cvt.rn.f16x2.e4m3x2" in text


def test_bad_arguments_are_refused():
    x, w, scale = _inputs(0, 2, 64, 256)
    with pytest.raises(ValueError, match="must share K"):
        fp8_gemv(x[:, :128], w, scale)
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        fp8_gemv(x, w.astype(jnp.bfloat16), scale)
    with pytest.raises(ValueError, match=r"scale must be \[N\]"):
        fp8_gemv(x, w, scale[:10])
    with pytest.raises(ValueError, match="1 <= M <= 64"):
        fp8_gemv(jnp.zeros((65, 256), jnp.bfloat16), w, scale)
    assert not gemv_supported(1, 100, 256) and not gemv_supported(1, 64, 200) and gemv_supported(64, 64, 256)


def test_fp8_model_decodes_through_the_kernel(tmp_path, monkeypatch):
    """An fp8 model whose config asks for the kernel runs its decode-sized projections through it
    (interpreted here) and gives the XLA weight-only path's tokens; calls the kernel does not
    serve (prefill chunks of more than 64 tokens, shapes it does not tile) keep the XLA path."""
    import jaxllm.pallas.fp8_gemv as gemv_module
    from jaxllm import LLM, SamplingParams

    write_kernel_sized_config(tmp_path, intermediate_size=512)  # K of every projection: 256 or 512
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 70)]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=2, decode_steps=2, compilation_cache=False,
              quantization="fp8")
    with LLM(str(tmp_path), **kw) as ref_llm:
        assert not ref_llm.model_config.fp8_gemv  # CPU: the loader leaves the kernel off
        expected = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, sp, use_tqdm=False)]
    calls = []
    real = gemv_module.fp8_gemv

    def interpreted(x, w, scale, **k):
        calls.append(x.shape)
        return real(x, w, scale, interpret=_interpret(), **k)

    monkeypatch.setattr(gemv_module, "fp8_gemv", interpreted)
    monkeypatch.setattr("jaxllm.loader.gemv_wanted", lambda mesh: True)
    with LLM(str(tmp_path), **kw) as llm:
        assert llm.model_config.fp8_gemv
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert calls and all(shape[0] <= 64 for shape in calls)  # the decode steps' projections
    assert got == expected


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1, 14336, 4096), (1, 4096, 14336), (8, 1024, 4096),
                                   (64, 4096, 4096), (3, 14336, 4096)])
def test_kernel_matches_reference_on_gpu(m, n, k):
    x, w, scale = _inputs(m + n + k, m, n, k)
    got = jax.jit(fp8_gemv)(x, w, scale)
    assert _rel_err(got, jax.jit(reference_fp8_gemv)(x, w, scale)) <= TOL


@pytest.mark.gpu
def test_kernel_variants_on_gpu():
    x, w, scale = _inputs(1, 4, 4096, 14336)
    want = jax.jit(reference_fp8_gemv)(x, w, scale)
    for kw in ({"num_splits": 1}, {"num_splits": 8, "max_concurrent_steps": 2}, {"block_k": 128},
               {"accumulate_in_place": False}):
        got = jax.jit(functools.partial(fp8_gemv, **kw))(x, w, scale)
        assert _rel_err(got, want) <= TOL, kw


@pytest.mark.gpu
def test_fp8_model_with_the_kernel_on_gpu(tmp_path, monkeypatch):
    """On a GPU, JAXLLM_FP8_GEMV=1 turns the kernel on for an fp8 model, whose greedy tokens and
    logprobs then follow the XLA weight-only path's (up to a near-tie)."""
    from jaxllm import LLM, SamplingParams

    write_kernel_sized_config(tmp_path, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                              num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    prompts = [{"prompt_token_ids": [3 + i % 200 for i in range(n)]} for n in (5, 40, 300)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=4, quantization="fp8", compilation_cache=False)
    monkeypatch.setenv("JAXLLM_FP8_GEMV", "0")
    with LLM(str(tmp_path), **kw) as ref_llm:
        assert not ref_llm.model_config.fp8_gemv
        expected = ref_llm.generate(prompts, sp, use_tqdm=False)
    monkeypatch.setenv("JAXLLM_FP8_GEMV", "1")
    with LLM(str(tmp_path), **kw) as llm:
        assert llm.model_config.fp8_gemv
        got = llm.generate(prompts, sp, use_tqdm=False)
    for e, g in zip(expected, got):
        et, gt = e.outputs[0].token_ids, g.outputs[0].token_ids
        n = next((i for i, (x, y) in enumerate(zip(et, gt)) if x != y), len(et))
        lp = [x[t].logprob for x, t in zip(g.outputs[0].logprobs, gt)][: n + 1]
        ref = [x[t].logprob for x, t in zip(e.outputs[0].logprobs, et)][: n + 1]
        assert lp == pytest.approx(ref, abs=0.05), (n, et, gt)
