"""The Pallas ragged paged prefill kernel against its jnp reference: on CPU through the Mosaic GPU
interpreter (and Mosaic's own CUDA lowering), on an H100 in the `gpu` suite (run through the
device tool)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import counting, write_kernel_sized_config
from jaxllm.pallas.prefill_attention import paged_prefill_attention, reference_prefill_attention

TOL = 2e-2  # bf16 kernel vs float32 reference, relative L2 error


def _inputs(seed, q_lens, ctx, h, kvh, d, bs, t=None, dtype=jnp.bfloat16):
    """Fresh random q [B, T, H, D], pools, a shuffled block table; row b has q_lens[b] queries
    after ctx[b] tokens of earlier context (its K/V all in the pool)."""
    rng = np.random.default_rng(seed)
    b = len(q_lens)
    t = t or max(q_lens)
    w = max(1, -(-max(n + c for n, c in zip(q_lens, ctx)) // bs))
    num_blocks = b * w + 3
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((num_blocks * bs, kvh, d)), dtype)
    v = jnp.asarray(rng.standard_normal((num_blocks * bs, kvh, d)), dtype)
    tables = jnp.asarray(rng.permutation(num_blocks)[: b * w].reshape(b, w), jnp.int32)
    return q, k, v, tables, jnp.asarray(ctx, jnp.int32), jnp.asarray(q_lens, jnp.int32)


def _fp8_inputs(seed, q_lens, ctx, h, kvh, d, bs, k_scale, v_scale):
    """As _inputs, with float8_e4m3fn pools holding clip(K / k_scale) and clip(V / v_scale)."""
    from jaxllm.runner.paged import to_pool

    q, k, v, tables, qs, ql = _inputs(seed, q_lens, ctx, h, kvh, d, bs, dtype=jnp.float32)
    k8, v8 = to_pool(3 * k, jnp.float8_e4m3fn, k_scale), to_pool(3 * v, jnp.float8_e4m3fn, v_scale)
    return q.astype(jnp.bfloat16), k8, v8, tables, qs, ql


def _check(args, bs, **kw):
    q, k, v, tables, qs, ql = args
    ref_kw = {n: kw[n] for n in ("soft_cap", "sliding_window", "k_scale", "v_scale") if n in kw}
    out = paged_prefill_attention(q, k, v, tables, qs, ql, bs, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = np.asarray(reference_prefill_attention(q, k, v, tables, qs, ql, bs, **ref_kw))
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err <= TOL, f"relative error {err:.3g}"
    pad = np.arange(q.shape[1])[None, :] >= np.asarray(ql)[:, None]
    assert not out[pad].any()  # padding queries: zeros
    return err


def _interpret(**kw):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams(**kw)


# (query lengths, earlier context, heads, kv heads, head dim, block size, kernel kwargs)
CPU_GRID = [
    ([1], [0], 4, 4, 64, 16, {}),  # one token, nothing before it
    ([70, 1, 33], [0, 40, 17], 4, 1, 64, 16, {}),  # MQA, ragged, non-multiples of the tile
    ([100, 5], [64, 130], 8, 2, 128, 32, {}),  # GQA 4, chunked prefill after several pages
    ([64, 128], [0, 200], 8, 1, 64, 64, {"max_concurrent_steps": 3}),  # GQA 8, a ring of 3
    ([90, 20], [30, 150], 4, 1, 64, 32, {"sliding_window": 50}),
    ([40, 65], [100, 0], 4, 2, 128, 16, {"sliding_window": 17, "soft_cap": 5.0}),
    ([80], [70], 2, 1, 256, 128, {}),  # head dim 256, pages of 128 read in two copies
    ([70, 9], [10, 190], 4, 2, 64, 16, {"block_kv": 128}),  # 128-token KV tiles of 8 pages
    ([3, 0], [12, 0], 4, 2, 64, 32, {}),  # an empty (padding) row beside a short one
]


@pytest.mark.parametrize("case", CPU_GRID, ids=lambda c: "q{}ctx{}h{}kv{}d{}bs{}".format(*c[:6]).replace(" ", ""))
def test_kernel_matches_reference_in_interpret_mode(case):
    q_lens, ctx, h, kvh, d, bs, kw = case
    for seed in range(2):  # fresh inputs each time
        _check(_inputs(seed, q_lens, ctx, h, kvh, d, bs), bs, interpret=_interpret(), **kw)


def test_rows_padded_past_their_queries():
    """T larger than every row (the engine's bucketed length), ragged rows inside it."""
    _check(_inputs(3, [17, 64, 2], [5, 0, 33], 4, 2, 64, 16, t=128), 16, interpret=_interpret())


FP8_CPU_GRID = [  # (query lengths, context, heads, kv heads, head dim, block size, k_scale, v_scale, kwargs)
    ([70, 3], [20, 90], 8, 2, 64, 16, 0.25, 0.5, {}),
    ([50], [100], 4, 1, 128, 32, 2.0, 0.125, {"sliding_window": 60}),
]


@pytest.mark.parametrize("case", FP8_CPU_GRID, ids=lambda c: "q{}ctx{}h{}kv{}d{}bs{}".format(*c[:6]).replace(" ", ""))
def test_fp8_kernel_matches_reference_in_interpret_mode(case):
    q_lens, ctx, h, kvh, d, bs, ks, vs, kw = case
    args = _fp8_inputs(0, q_lens, ctx, h, kvh, d, bs, ks, vs)
    assert args[1].dtype == jnp.float8_e4m3fn
    _check(args, bs, interpret=_interpret(), k_scale=ks, v_scale=vs, **kw)


def test_no_races_in_the_stage_ring():
    """The interpreter's race detector follows every TMA copy and barrier of the refill scheme."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _inputs(7, [70, 20], [150, 300], 4, 1, 64, 16)  # several steps through a ring of 2 and 3
    for stages in (2, 3):
        _check(args, 16, interpret=_interpret(detect_races=True), max_concurrent_steps=stages)
        assert not get_races().races_found


def test_causal_mask_is_applied():
    """A kernel that let a query see later positions would miss by far more than the tolerance."""
    q, k, v, tables, qs, ql = _inputs(4, [64], [0], 2, 1, 64, 16)
    out = np.asarray(paged_prefill_attention(q, k, v, tables, qs, ql, 16, interpret=_interpret()), np.float32)
    full = np.asarray(reference_prefill_attention(q, k, v, tables, qs + 63, ql, 16))  # every query sees all 64
    assert np.linalg.norm(out - full) / np.linalg.norm(full) > 10 * TOL


LOWER_GRID = [  # (batch, T, heads, kv heads, head dim, block size, kwargs)
    (2, 256, 32, 8, 128, 16, {}),
    (4, 512, 32, 8, 128, 32, {"max_concurrent_steps": 3}),
    (1, 100, 8, 8, 64, 32, {}),
    (3, 128, 16, 2, 256, 64, {}),
    (2, 64, 8, 1, 64, 128, {"sliding_window": 100}),
    (2, 256, 32, 8, 128, 16, {"block_kv": 128}),
    (2, 128, 16, 4, 128, 32, {"soft_cap": 30.0}),
    (2, 256, 32, 8, 128, 32, {"kv_dtype": jnp.float8_e4m3fn, "k_scale": 0.5, "v_scale": 2.0}),
    (1, 64, 8, 2, 256, 128, {"kv_dtype": jnp.float8_e4m3fn}),
    (2, 128, 8, 2, 128, 32, {"accumulate_in_place": False}),
]


def _lower(b, t, h, kvh, d, bs, kv_dtype=jnp.bfloat16, **kw):
    """The kernel's module lowered for an NVIDIA GPU, as text."""
    w = 4096 // bs
    pool = (b * w * bs, kvh, d)
    args = (
        jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16),
        jax.ShapeDtypeStruct(pool, kv_dtype),
        jax.ShapeDtypeStruct(pool, kv_dtype),
        jax.ShapeDtypeStruct((b, w), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    fn = jax.jit(lambda *a: paged_prefill_attention(*a, bs, **kw))
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case", LOWER_GRID, ids=str)
def test_kernel_lowers_for_cuda(case):
    """Mosaic GPU's own lowering (layout inference, TMA tiling, the shared-memory budget) runs on
    CPU too: every configuration must lower for an NVIDIA GPU (with the in-place P @ V
    accumulation the interpreter cannot run)."""
    *shape, kw = case
    text = _lower(*shape, **kw)
    assert "mosaic_gpu" in text
    if kw.get("kv_dtype") == jnp.float8_e4m3fn:
        assert "cvt.rn.f16x2.e4m3x2" in text


def test_bad_arguments_are_refused():
    q, k, v, tables, qs, ql = _inputs(0, [4], [0], 6, 4, 64, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_prefill_attention(q, k, v, tables, qs, ql, 16)
    q, k, v, tables, qs, ql = _inputs(0, [4], [0], 4, 2, 48, 16)
    with pytest.raises(ValueError, match="head_dim must be"):
        paged_prefill_attention(q, k, v, tables, qs, ql, 16)
    q, k, v, tables, qs, ql = _inputs(0, [4], [0], 4, 2, 64, 16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16, float16 or float8_e4m3fn"):
        paged_prefill_attention(q, k, v, tables, qs, ql, 16)
    q, k, v, tables, qs, ql = _inputs(0, [4], [0], 4, 2, 64, 16)
    with pytest.raises(ValueError, match="block_kv must be a multiple of 64"):
        paged_prefill_attention(q, k, v, tables, qs, ql, 16, block_kv=96)
    with pytest.raises(ValueError, match="sliding_window must be"):
        paged_prefill_attention(q, k, v, tables, qs, ql, 16, sliding_window=0)


# -- GPU suite ---------------------------------------------------------------------------------
GPU_GRID = [  # (query lengths, context, heads, kv heads, head dim, block size)
    ([2048], [0], 32, 8, 128, 32),
    ([512] * 8, [0, 100, 1000, 3000, 0, 64, 7, 2048], 32, 8, 128, 16),
    ([1, 17, 300, 1000], [4000, 0, 33, 2000], 32, 4, 128, 32),
    ([1024, 256], [8192, 100], 16, 2, 256, 64),
    ([700, 2048], [0, 0], 8, 8, 64, 128),
    ([256] * 32, [512] * 32, 32, 8, 128, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}".format(len(c[0]), *c[2:]))
def test_kernel_matches_reference_on_gpu(case):
    q_lens, ctx, h, kvh, d, bs = case
    _check(_inputs(hash(str(case)) % 2**31, q_lens, ctx, h, kvh, d, bs), bs)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"sliding_window": 1000}, {"soft_cap": 30.0}, {"max_concurrent_steps": 3},
                                {"block_kv": 128}, {"k_scale": 0.5, "v_scale": 2.0, "fp8": True},
                                {"accumulate_in_place": False}], ids=str)
def test_kernel_variants_on_gpu(kw):
    kw = dict(kw)
    lens, ctx = [1000, 37, 512], [1500, 4000, 0]
    if kw.pop("fp8", False):
        args = _fp8_inputs(1, lens, ctx, 32, 8, 128, 32, kw["k_scale"], kw["v_scale"])
    else:
        args = _inputs(1, lens, ctx, 32, 8, 128, 32)
    _check(args, 32, **kw)


def test_engine_prefills_through_the_kernel(tmp_path):
    """Chunked and prefix-cached prefill through the (interpreted) kernel give the reference path's
    tokens; whole fresh prompts keep their own path."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.runner.paged import prefill_kernel_for

    write_kernel_sized_config(tmp_path)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40)]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=2, max_num_tokens=32, decode_steps=2,
              compilation_cache=False)
    with LLM(str(tmp_path), **kw) as ref_llm:
        expected = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, sp, use_tqdm=False)]
    with LLM(str(tmp_path), **kw) as llm:
        runner = llm._engine.runner
        traced = []
        runner._prefill_kernel = counting(prefill_kernel_for(runner.block_size, None, llm._mesh, interpret=_interpret()),
                                          traced)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]  # cached prefixes
    assert traced and all(shape[2:] == (4, 64) and shape[1] > 1 for shape in traced)
    assert got == expected and again == expected


@pytest.mark.gpu
def test_llm_chunked_prefill_uses_the_kernel_on_gpu(tmp_path):
    """On a GPU the Pallas backend serves chunked and prefix-cached prefill with the kernel; tokens
    and logprobs follow the reference backend's (up to a near-tie)."""
    from jaxllm import LLM, SamplingParams

    write_kernel_sized_config(tmp_path, hidden_size=512, intermediate_size=512, num_attention_heads=8, head_dim=128, max_position_embeddings=2048)
    prompts = [{"prompt_token_ids": [3 + i % 200 for i in range(n)]} for n in (5, 700, 300)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=4, max_num_tokens=256, compilation_cache=False)
    with LLM(str(tmp_path), attention_backend="reference", **kw) as ref_llm:
        expected = ref_llm.generate(prompts, sp, use_tqdm=False)
    with LLM(str(tmp_path), attention_backend="pallas", **kw) as llm:
        assert llm._engine.runner._prefill_kernel is not None
        got = llm.generate(prompts, sp, use_tqdm=False)
        again = llm.generate(prompts, sp, use_tqdm=False)  # prefix-cached
    for e, g, a in zip(expected, got, again):
        for out in (g, a):
            lp = [x[t].logprob for x, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
            ref = [x[t].logprob for x, t in zip(e.outputs[0].logprobs, e.outputs[0].token_ids)]
            n = next((i for i, (x, y) in enumerate(zip(e.outputs[0].token_ids, out.outputs[0].token_ids)) if x != y),
                     16)
            assert lp[: n + 1] == pytest.approx(ref[: n + 1], abs=0.05), (n, e.outputs[0].token_ids,
                                                                          out.outputs[0].token_ids)
