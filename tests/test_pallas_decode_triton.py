"""The Triton-backend paged decode kernel (pallas.decode_attention_triton) against the float32
reference: on CPU in Pallas' interpreter and lowered for CUDA, on an H100 in the `gpu` suite (run
through the device tool); the runner's switch to it and the engine's tokens through it."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm.pallas.decode_attention import reference_decode_attention
from jaxllm.pallas.decode_attention_triton import paged_decode_attention_triton
from test_pallas_decode import _fp8_inputs, _inputs, engine_tokens_through_the_kernel

TOL = 2e-2  # 16-bit kernel vs float32 reference, relative L2 error
REF_ARGS = ("soft_cap", "sliding_window", "k_scale", "v_scale")


def _check(args, bs, **kw):
    q, k, v, tables, lens = args
    out = paged_decode_attention_triton(q, k, v, tables, lens, bs, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = np.asarray(reference_decode_attention(q, k, v, tables, lens, bs, **{n: kw[n] for n in REF_ARGS if n in kw}))
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= TOL, f"relative error {err:.3g}"
    return err, ref


# (batch, heads, kv_heads, head_dim, block_size, max_len, kernel kwargs)
CPU_GRID = [
    (1, 4, 1, 64, 16, 1, {}),  # a single token of context
    (3, 8, 2, 64, 16, 200, {}),  # GQA 4, several tiles, ragged lengths
    (2, 8, 8, 128, 32, 300, {"block_kv": 32}),  # MHA (G = 1, padded to 16 rows), tiles within a page
    (2, 16, 1, 64, 8, 90, {"block_kv": 16}),  # G = 16, pages of 8: two pages a tile
    (4, 4, 2, 64, 32, 400, {"sliding_window": 100}),
    (2, 4, 1, 128, 16, 150, {"soft_cap": 5.0, "block_kv": 128}),
    (3, 12, 4, 64, 24, 100, {}),  # G = 3 (not a power of two), pages of 24 tokens
    (3, 8, 2, 64, 16, 200, {"heads_fastest": True}),  # the grid's KV heads vary fastest
]


@pytest.mark.parametrize("case", CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}len{}".format(*c[:6]))
def test_kernel_matches_reference_in_interpret_mode(case):
    b, h, kvh, d, bs, max_len, kw = case
    for seed in range(2):
        _check(_inputs(seed, b, h, kvh, d, bs, max_len), bs, interpret=True, **kw)


@pytest.mark.parametrize("k_scale,v_scale,kw", [(0.25, 0.5, {}), (1.0, 1.0, {"block_kv": 32}),
                                                (0.5, 2.0, {"sliding_window": 70})], ids=str)
def test_fp8_kernel_matches_reference_in_interpret_mode(k_scale, v_scale, kw):
    args = _fp8_inputs(0, 3, 8, 2, 64, 16, 200, k_scale, v_scale)
    err, ref = _check(args, 16, k_scale=k_scale, v_scale=v_scale, interpret=True, **kw)
    # the scales matter: the same pools read as if unscaled are far off
    q, k, v, tables, lens = args
    if (k_scale, v_scale) != (1.0, 1.0):
        out = np.asarray(paged_decode_attention_triton(q, k, v, tables, lens, 16, interpret=True, **kw), np.float32)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) > 10 * max(err, 1e-3)


def test_bad_arguments_are_refused():
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 64, 16, 32)
    with pytest.raises(ValueError, match="block_kv must be a power of two >= 16, got 48"):
        paged_decode_attention_triton(q, k, v, tables, lens, 16, block_kv=48, interpret=True)
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 96, 16, 32)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 16 .* got 96"):
        paged_decode_attention_triton(q, k, v, tables, lens, 16, interpret=True)


@pytest.mark.parametrize("pool", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("block_kv,masked", [(32, False), (64, False), (128, False), (64, True)])
def test_kernel_lowers_for_cuda_at_the_throughput_shape(cuda_lowering, pool, block_kv, masked):
    S = jax.ShapeDtypeStruct
    args = (S((1024, 32, 128), jnp.bfloat16), S((16384 * 16, 8, 128), pool), S((16384 * 16, 8, 128), pool),
            S((1024, 32), jnp.int32), S((1024,), jnp.int32))
    text = cuda_lowering(lambda *a: paged_decode_attention_triton(*a, 16, block_kv=block_kv, k_scale=0.5, v_scale=2.0,
                                                                  masked_loads=masked), *args)
    assert "triton" in text


def test_switch_and_tiling(monkeypatch):
    """JAXLLM_ATTN_TRITON: auto (default) keeps the Mosaic kernel; 1 takes the Triton one where its
    programs fill the GPU (>= 4 an SM), 0 never; anything else refused. The tiling switch parses or
    is refused naming itself."""
    from jaxllm.runner import paged

    monkeypatch.delenv(paged.TRITON_DECODE_ENV, raising=False)
    assert not paged.triton_decode_wanted(1024, 8)
    monkeypatch.setenv(paged.TRITON_DECODE_ENV, "1")
    assert paged.triton_decode_wanted(1024, 8) and paged.triton_decode_wanted(66, 8)
    assert not paged.triton_decode_wanted(65, 8) and not paged.triton_decode_wanted(1, 8)
    monkeypatch.setenv(paged.TRITON_DECODE_ENV, "0")
    assert not paged.triton_decode_wanted(1024, 8)
    monkeypatch.setenv(paged.TRITON_DECODE_ENV, "yes")
    with pytest.raises(ValueError, match="JAXLLM_ATTN_TRITON='yes'"):
        paged.triton_decode_wanted(1024, 8)
    monkeypatch.delenv(paged.TRITON_TILING_ENV, raising=False)
    assert paged.triton_decode_tiling() == {}
    monkeypatch.setenv(paged.TRITON_TILING_ENV, "128/8/3")
    assert paged.triton_decode_tiling() == dict(block_kv=128, num_warps=8, num_stages=3)
    monkeypatch.setenv(paged.TRITON_TILING_ENV, "128/8")
    with pytest.raises(ValueError, match="JAXLLM_ATTN_TRITON_TILING='128/8': expected block_kv/num_warps/num_stages"):
        paged.triton_decode_tiling()


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_engine_decodes_through_the_triton_kernel(tmp_path, monkeypatch, kv):
    """JAXLLM_ATTN_TRITON=1: the runner's decode path through the (interpreted) Triton kernel gives
    the reference path's tokens (fp8: per-layer scales that are not 1)."""
    from jaxllm.pallas import decode_attention_triton
    from jaxllm.runner import paged

    monkeypatch.setenv(paged.TRITON_DECODE_ENV, "1")
    monkeypatch.setenv(paged.TRITON_TILING_ENV, "16/4/1")
    monkeypatch.setattr(paged, "TRITON_MIN_PROGRAMS_PER_SM", 0)  # the tiny batch takes it too
    calls = []
    real = decode_attention_triton.paged_decode_attention_triton
    monkeypatch.setattr(decode_attention_triton, "paged_decode_attention_triton",
                        lambda *a, **kw: calls.append(kw["block_kv"]) or real(*a, **kw))
    expected, got, traced = engine_tokens_through_the_kernel(tmp_path, kv, True)
    assert traced and calls and set(calls) == {16}  # decode went through the Triton kernel, its tiling passed on
    assert got == expected


# -- on an H100 (the `gpu` suite) --------------------------------------------------------------
GPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, context, fp8, kwargs)
    (1024, 32, 8, 128, 16, 160, True, {}),
    (1024, 32, 8, 128, 16, 160, False, {}),
    (1024, 32, 8, 128, 16, 160, True, {"masked_loads": True}),
    (1024, 32, 8, 128, 16, 160, True, {"heads_fastest": True}),
    (256, 32, 8, 128, 16, 1000, True, {"block_kv": 128, "num_warps": 8}),
    (128, 32, 8, 128, 32, 600, True, {"block_kv": 32, "num_stages": 3, "sliding_window": 300}),
    (64, 28, 4, 128, 16, 300, False, {"soft_cap": 30.0}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}ctx{}".format(*c[:6]) + ("-fp8" if c[6] else ""))
def test_kernel_matches_reference_on_gpu(case):
    b, h, kvh, d, bs, ctx, fp8, kw = case
    if fp8:
        args = _fp8_inputs(1, b, h, kvh, d, bs, ctx, 0.5, 0.25)
        kw = {**kw, "k_scale": 0.5, "v_scale": 0.25}
    else:
        args = _inputs(1, b, h, kvh, d, bs, ctx)
    _check(args, bs, **kw)
