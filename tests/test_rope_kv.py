"""pallas.rope_kv (a decode step's q/k/v epilogue, RoPE and KV writes in one kernel) against its
jnp reference and the model's unfused path, in Pallas interpret mode; compiled on the GPU in the
`gpu` suite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.rope_kv import reference_rope_kv_write, rope_kv_fits, rope_kv_write

FP8 = jnp.float8_e4m3fn


def _case(seed, splits, rows, kvh, g, d, pool_dtype, parts_dtype=jnp.float32, pool_slots=48):
    key = jax.random.key(seed)
    ks = jax.random.split(key, 4)
    parts = jax.random.normal(ks[0], (splits, rows, kvh, g + 2, d), jnp.float32).astype(parts_dtype)
    positions = (jnp.arange(rows) * 37 + 5) % 500
    inv_freq = 1.0 / (500000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
    angles = positions[:, None].astype(jnp.float32) * inv_freq
    slots = jax.random.permutation(ks[1], pool_slots)[:rows].astype(jnp.int32)
    slots = jnp.where(jnp.arange(rows) % 3 == 1, -1, slots)  # some padding rows
    pools = [jax.random.normal(k, (pool_slots, kvh, d), jnp.float32).astype(pool_dtype) for k in ks[2:]]
    return parts, positions, inv_freq, jnp.cos(angles), jnp.sin(angles), slots, pools


def _equal(a, b):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@pytest.mark.parametrize("splits, rows, pool, row_scaled, col_scaled, parts_dtype", [
    (1, 1, jnp.bfloat16, False, False, jnp.bfloat16),  # a plain projection, batch 1
    (2, 1, jnp.bfloat16, False, True, jnp.float32),  # a split-K gemv's partials
    (1, 7, FP8, True, True, jnp.bfloat16),  # an FP8 x FP8 product still to scale, fp8 pool
    (4, 5, FP8, False, False, jnp.float32),
])
def test_kernel_is_the_reference_exactly(splits, rows, pool, row_scaled, col_scaled, parts_dtype):
    kvh, g, d = 2, 4, 64
    parts, _, _, cos, sin, slots, (kp, vp) = _case(rows + splits, splits, rows, kvh, g, d, pool, parts_dtype)
    kw = dict(group=g, dtype=jnp.bfloat16, k_scale=0.5 if pool == FP8 else 1.0, v_scale=2.0 if pool == FP8 else 1.0,
              row_scale=jnp.linspace(0.5, 1.5, rows) if row_scaled else None,
              col_scale=jnp.linspace(0.1, 2.0, kvh * (g + 2) * d).reshape(kvh, g + 2, d) if col_scaled else None)
    want = reference_rope_kv_write(parts, cos, sin, slots, kp, vp, **kw)
    got = rope_kv_write(parts, cos, sin, slots, kp, vp, interpret=True, **kw)
    assert got[0].shape == (rows, kvh * g, d) and got[0].dtype == jnp.bfloat16
    assert got[1].dtype == pool and got[1].shape == kp.shape
    for a, b in zip(got, want):
        _equal(a, b)
    untouched = np.setdiff1d(np.arange(kp.shape[0]), np.asarray(slots))
    _equal(got[1][untouched], kp[untouched])  # padding rows write nothing
    assert not np.array_equal(np.asarray(got[1][slots[0]], np.float32), np.asarray(kp[slots[0]], np.float32))


def test_reference_is_the_models_unfused_path():
    """reference_rope_kv_write = Partials.total / Scaled.value, models/llama.py's apply_rope on q and
    k, runner/paged.py's to_pool and write_slots (what the decode path ran before the kernel)."""
    from jaxllm.models.llama import apply_rope
    from jaxllm.models.quant import Partials, Scaled
    from jaxllm.runner.paged import to_pool, write_slots

    kvh, g, d, rows = 2, 4, 64, 6
    parts, positions, inv_freq, cos, sin, slots, (kp, vp) = _case(3, 2, rows, kvh, g, d, FP8)
    for form in ("partials", "scaled"):
        if form == "partials":
            qkv, kw = Partials(parts[:, :, None]).total(jnp.bfloat16), {}
            ref_parts = parts
        else:
            raw = parts[0].astype(jnp.bfloat16)
            x_scale, w_scale = jnp.linspace(0.5, 1.5, rows)[:, None, None, None, None], jnp.full((kvh, g + 2, d), 0.3)
            qkv = Scaled(raw[:, None], x_scale, w_scale, jnp.bfloat16).value()
            ref_parts, kw = raw[None], dict(row_scale=x_scale.reshape(rows), col_scale=w_scale)
        q = apply_rope(qkv[:, :, :, :g].reshape(rows, 1, kvh * g, d), positions[:, None], inv_freq)
        k = apply_rope(qkv[:, :, :, g], positions[:, None], inv_freq)
        k_pool = write_slots(kp, slots[:, None], to_pool(k, FP8, 0.5), padding_page=False)
        v_pool = write_slots(vp, slots[:, None], to_pool(qkv[:, :, :, g + 1], FP8, 2.0), padding_page=False)
        got = reference_rope_kv_write(ref_parts, cos, sin, slots, kp, vp, group=g, dtype=jnp.bfloat16, k_scale=0.5,
                                      v_scale=2.0, **kw)
        for a, b in zip(got, (q[:, 0], k_pool, v_pool)):
            _equal(a, b)


@pytest.mark.parametrize("form", ["array", "partials", "scaled"])
def test_rope_attend_is_attend_of_the_roped_projection(form):
    """PagedAttend.rope_attend on the projection as the model hands it over (an array, split-K
    ``Partials``, an unscaled FP8 product ``Scaled``) = attend (``__call__``) of q, k, v finished
    and roped by the model's own functions: the same attention output and pools, exactly."""
    from jaxllm.models.llama import apply_rope, rope_cos_sin
    from jaxllm.models.quant import Partials, Scaled
    from jaxllm.runner.paged import make_attend, rope_kv_kernel_for

    kvh, g, d, rows, bs = 2, 4, 64, 3, 16
    parts, _, inv_freq, _, _, _, (kp, vp) = _case(11, 2, rows, kvh, g, d, FP8, pool_slots=96)
    positions = jnp.asarray([[4], [19], [40]], jnp.int32)
    tables = jnp.asarray([[0, 1, 2, 3], [4, 5, 0, 0], [1, 3, 5, 2]], jnp.int32)  # 16-token pages
    slots = jnp.take_along_axis(tables, positions // bs, axis=1) * bs + positions % bs
    x_scale, w_scale = jnp.linspace(0.5, 1.5, rows)[:, None, None, None, None], jnp.full((kvh, g + 2, d), 0.3)
    handed = {"array": parts[0, :, None].astype(jnp.bfloat16), "partials": Partials(parts[:, :, None]),
              "scaled": Scaled(parts[0, :, None].astype(jnp.bfloat16), x_scale, w_scale, jnp.bfloat16)}[form]
    qkv = handed.total(jnp.bfloat16) if form == "partials" else handed.value() if form == "scaled" else handed
    kw = dict(kv_scales=((0.5, 2.0),))
    attend = make_attend(positions, slots, tables, bs, **kw)
    q = apply_rope(qkv[:, :, :, :g].reshape(rows, 1, kvh * g, d), positions, inv_freq)
    k = apply_rope(qkv[:, :, :, g], positions, inv_freq)
    want, want_cache = attend(0, q, k, qkv[:, :, :, g + 1], [(kp, vp)])
    fused = make_attend(positions, slots, tables, bs, rope_kv=rope_kv_kernel_for(interpret=True), **kw)
    assert fused.rope_kv_serves(positions, g, d) and not attend.rope_kv_serves(positions, g, d)
    got, got_cache = fused.rope_attend(0, handed, *rope_cos_sin(positions, inv_freq), g, jnp.bfloat16, [(kp, vp)])
    _equal(got, want)
    for a, b in zip(got_cache[0], want_cache[0]):
        _equal(a, b)


def test_rope_attend_takes_split_counts_the_kernel_does_not_in_jnp():
    """Three split-K partials (a gemv tiling forced by JAXLLM_GEMV_TILING): rope_attend finishes
    them with the jnp reference instead of the kernel, with the same result as two-split partials
    holding the same sums."""
    from jaxllm.models.llama import rope_cos_sin
    from jaxllm.models.quant import Partials
    from jaxllm.runner.paged import make_attend

    kvh, g, d, rows = 2, 4, 64, 2
    parts, _, inv_freq, _, _, _, (kp, vp) = _case(5, 3, rows, kvh, g, d, jnp.bfloat16, pool_slots=64)
    positions = jnp.asarray([[3], [20]], jnp.int32)
    tables = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    slots = jnp.take_along_axis(tables, positions // 16, axis=1) * 16 + positions % 16
    calls = []
    attend = make_attend(positions, slots, tables, 16, rope_kv=lambda *a, **k: calls.append(1) or rope_kv_write(
        *a, interpret=True, **k))
    cos, sin = rope_cos_sin(positions, inv_freq)
    got = attend.rope_attend(0, Partials(parts[:, :, None]), cos, sin, g, jnp.bfloat16, [(kp, vp)])
    assert not calls  # three splits: not the kernel's
    two = jnp.stack([parts[0] + parts[1], parts[2]])  # the same sums in float32 up to order: compare closely
    want = attend.rope_attend(0, Partials(two[:, :, None]), cos, sin, g, jnp.bfloat16, [(kp, vp)])
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), rtol=2e-2, atol=2e-2)


def test_shapes_the_kernel_serves_and_refuses():
    assert rope_kv_fits((2, 1, 8, 6, 128), 4) and rope_kv_fits((1, 9, 2, 4, 32), 2)
    assert not rope_kv_fits((1, 1, 4, 9, 128), 7)  # Qwen2-style 7 query heads a KV head
    assert not rope_kv_fits((3, 1, 8, 6, 128), 4) and not rope_kv_fits((1, 1, 8, 6, 96), 4)
    parts, _, _, cos, sin, slots, (kp, vp) = _case(0, 1, 2, 2, 4, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="powers of two"):
        rope_kv_write(parts[:, :, :, :5], cos, sin, slots, kp, vp, group=3, dtype=jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="do not match"):
        rope_kv_write(parts, cos[:, :16], sin, slots, kp, vp, group=4, dtype=jnp.bfloat16, interpret=True)


def test_switch(monkeypatch):
    """JAXLLM_FUSED_ROPE_KV: auto = one NVIDIA GPU with the Triton backend; 1 forces it on one
    device (never on several: the kernel is not written per shard); other values refused."""
    from types import SimpleNamespace

    from jaxllm.pallas.gemv import triton_available
    from jaxllm.runner.paged import fused_rope_kv_wanted

    def mesh(platform, n=1):
        return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)] * n))

    monkeypatch.delenv("JAXLLM_FUSED_ROPE_KV", raising=False)
    assert fused_rope_kv_wanted(mesh("gpu")) == triton_available() and not fused_rope_kv_wanted(mesh("cpu"))
    assert not fused_rope_kv_wanted(mesh("gpu", 2))
    monkeypatch.setenv("JAXLLM_FUSED_ROPE_KV", "1")
    assert fused_rope_kv_wanted(mesh("cpu")) and not fused_rope_kv_wanted(mesh("gpu", 2))
    monkeypatch.setenv("JAXLLM_FUSED_ROPE_KV", "0")
    assert not fused_rope_kv_wanted(mesh("gpu"))
    monkeypatch.setenv("JAXLLM_FUSED_ROPE_KV", "yes")
    with pytest.raises(ValueError, match="JAXLLM_FUSED_ROPE_KV='yes'"):
        fused_rope_kv_wanted(mesh("gpu"))


@pytest.mark.parametrize("kv, quantization", [("auto", None), ("fp8", "fp8")])
def test_decode_through_the_kernel_gives_the_same_tokens(tiny_checkpoints, monkeypatch, kv, quantization):
    """An engine whose decode calls hand the fused q/k/v projection to the rope_kv kernel (interpret
    mode here) generates exactly the tokens of the unfused path (bf16, fp8 KV with scales, fp8 weights)."""
    from jaxllm import LLM, KvCacheConfig, SamplingParams
    from jaxllm.runner.paged import rope_kv_kernel_for

    monkeypatch.setenv("JAXLLM_FUSED_QKV", "1")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 21, 40)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=4, decode_steps=3, compilation_cache=False,
              kv_cache_config=KvCacheConfig(dtype=kv), quantization=quantization)
    scales = ((0.7, 1.3), (1.5, 0.6)) if kv == "fp8" else None

    def run(fused):
        with LLM(str(tiny_checkpoints["llama3"]), **kw) as llm:
            runner = llm._engine.runner
            assert runner._rope_kv is None and llm.model_config.fused_qkv  # CPU: off by default
            if scales:
                runner.kv_scales = scales
            calls = []
            if fused:
                kernel = rope_kv_kernel_for(interpret=True)
                runner._rope_kv = lambda parts, *a, **k: calls.append(parts.shape) or kernel(parts, *a, **k)
            return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], calls

    want, _ = run(False)
    got, calls = run(True)
    assert calls and all(shape[1] in (1, 2, 4) and shape[3:] == (4, 32) for shape in calls)  # decode rows only
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("splits, rows, pool", [(2, 1, jnp.bfloat16), (1, 1024, FP8), (1, 256, jnp.bfloat16)])
def test_kernel_compiled_on_the_gpu_matches_reference(splits, rows, pool):
    """Llama-3.1-8B's heads (8 KV heads of 4 query heads, head dim 128): batch 1's split-K partials
    and a 1024-row FP8 product with its scales, compiled by Triton; within one bf16 rounding (the
    GPU may contract the RoPE products into FMAs)."""
    kvh, g, d = 8, 4, 128
    parts, _, _, cos, sin, slots, (kp, vp) = _case(rows, splits, rows, kvh, g, d, pool,
                                                   jnp.bfloat16 if rows > 1 else jnp.float32, pool_slots=4096)
    kw = dict(group=g, dtype=jnp.bfloat16, k_scale=0.5 if pool == FP8 else 1.0,
              row_scale=jnp.linspace(0.5, 1.5, rows) if rows > 1 else None,
              col_scale=jnp.linspace(0.1, 2.0, kvh * (g + 2) * d).reshape(kvh, g + 2, d))
    want = reference_rope_kv_write(parts, cos, sin, slots, kp, vp, **kw)
    got = rope_kv_write(parts, cos, sin, slots, kp, vp, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                   rtol=2 ** -6, atol=2 ** -6)
    untouched = np.setdiff1d(np.arange(kp.shape[0]), np.asarray(slots))
    _equal(got[1][untouched], kp[untouched])


@pytest.mark.parametrize("pool, scaled, block_n, block_k", [
    (jnp.bfloat16, True, 2, 256), (FP8, True, 4, 128), (FP8, False, 16, 256), (jnp.bfloat16, False, 8, 64)])
def test_gemv_rope_kv_is_rope_kv_of_the_one_split_product(pool, scaled, block_n, block_k):
    """gemv_rope_kv_write (one row: the fp8 q/k/v projection, its RoPE and KV writes in one kernel)
    is rope_kv_write of pallas.gemv's one-split product, exactly (interpret mode); a padding slot
    writes nothing."""
    from jaxllm.pallas.gemv import gemv
    from jaxllm.pallas.rope_kv import gemv_rope_kv_write

    kvh, g, d, k = 2, 4, 32, 256
    n = kvh * (g + 2) * d
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(jax.random.key(1), (n, k), jnp.float32)).astype(FP8)
    scale = jnp.linspace(0.5, 2.0, n) if scaled else None
    _, _, _, cos, sin, _, (kp, vp) = _case(3, 1, 1, kvh, g, d, pool)
    kw = dict(group=g, dtype=jnp.bfloat16, k_scale=0.5 if pool == FP8 else 1.0, v_scale=1.5 if pool == FP8 else 1.0)
    product = gemv(x, w, scale, k_minor=True, block_n=32, block_k=k, splits=1, fma=True, interpret=True)
    for slot in (7, -1):
        slots = jnp.array([slot], jnp.int32)
        want = reference_rope_kv_write(product.reshape(1, 1, kvh, g + 2, d), cos, sin, slots, kp, vp, **kw)
        got = gemv_rope_kv_write(x, w, scale, cos, sin, slots, kp, vp, block_n=block_n, block_k=block_k,
                                 interpret=True, **kw)
        for a, b in zip(got, want):
            _equal(a, b)
    _equal(got[1], kp)  # the padding slot's call left the pools as they were


def test_batch_one_decode_through_the_gemv_rope_kv_kernel(tiny_checkpoints, monkeypatch):
    """Batch-1 decode with fp8 weights: the q/k/v projection handed over still to run
    (quant.PendingGemv) goes through gemv_rope_kv_write -- the same tokens as rope_kv_write after
    the gemv's split-K partials (JAXLLM_GEMV_ROPE_KV=0), logprobs within the split's rounding."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.pallas import rope_kv
    from jaxllm.runner.paged import rope_kv_kernel_for

    for var, value in (("JAXLLM_FUSED_QKV", "1"), ("JAXLLM_GEMV", "1"), ("JAXLLM_GEMV_TILING", "64x256=32,32,2")):
        monkeypatch.setenv(var, value)
    real, out = rope_kv.gemv_rope_kv_write, {}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    for on in ("0", "1"):
        monkeypatch.setenv("JAXLLM_GEMV_ROPE_KV", on)
        jax.clear_caches()  # the layers' shared jit would keep the other run's trace
        calls = []
        monkeypatch.setattr(rope_kv, "gemv_rope_kv_write", lambda *a, calls=calls, **k: calls.append(1) or real(*a, **k))
        with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=64, max_batch_size=1, compilation_cache=False,
                 quantization="fp8", dtype="bfloat16") as llm:
            llm._engine.runner._rope_kv = rope_kv_kernel_for(interpret=True)
            o = llm.generate([{"prompt_token_ids": [3, 14, 15, 92, 65]}], sp, use_tqdm=False)[0].outputs[0]
        out[on] = (o.token_ids, [sorted(d.items()) for d in o.logprobs], calls)
    assert not out["0"][2] and out["1"][2]  # the kernel ran where asked, only there
    assert out["1"][0] == out["0"][0]
    for a, b in zip(out["1"][1], out["0"][1]):
        assert [t for t, _ in a] == [t for t, _ in b]
        np.testing.assert_allclose([lp.logprob for _, lp in a], [lp.logprob for _, lp in b], atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("pool", [jnp.bfloat16, FP8])
def test_gemv_rope_kv_compiled_on_the_gpu(pool):
    """Llama-3.1-8B's fp8 q/k/v projection (8 KV heads of 4, head dim 128, K 4096) with its RoPE and
    KV writes, compiled: within a bf16 rounding or two of rope_kv of the one-split product."""
    from jaxllm.pallas.gemv import gemv
    from jaxllm.pallas.rope_kv import gemv_rope_kv_write

    kvh, g, d, k = 8, 4, 128, 4096
    n = kvh * (g + 2) * d
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(jax.random.key(1), (n, k), jnp.float32)).astype(FP8)
    scale = jnp.linspace(0.5, 2.0, n)
    _, _, _, cos, sin, _, (kp, vp) = _case(5, 1, 1, kvh, g, d, pool, pool_slots=4096)
    kw = dict(group=g, dtype=jnp.bfloat16, k_scale=0.5 if pool == FP8 else 1.0)
    slots = jnp.array([1234], jnp.int32)
    product = gemv(x, w, scale, k_minor=True, block_n=32, block_k=512, splits=1, fma=True)
    want = reference_rope_kv_write(product.reshape(1, 1, kvh, g + 2, d), cos, sin, slots, kp, vp, **kw)
    got = gemv_rope_kv_write(x, w, scale, cos, sin, slots, kp, vp, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                   rtol=2 ** -5, atol=2 ** -5)
    _equal(got[1][:1234], kp[:1234])


def test_gemv_rope_kv_tiling_default_and_override(monkeypatch):
    """The model's gemv_rope_kv_write tiling: its defaults (block_k at most K's power-of-two factor),
    JAXLLM_ROPE_KV_TILING=block_n/block_k/num_warps for A/Bs, and a clear error for a bad value."""
    from jaxllm.runner.paged import ROPE_KV_TILING_ENV, _rope_kv_tiling

    monkeypatch.delenv(ROPE_KV_TILING_ENV, raising=False)
    assert _rope_kv_tiling(4096) == dict(block_k=2048) and _rope_kv_tiling(96) == dict(block_k=32)
    monkeypatch.setenv(ROPE_KV_TILING_ENV, "4/4096/4")
    assert _rope_kv_tiling(4096) == dict(block_n=4, block_k=4096, num_warps=4)
    for bad in ("4/4096", "a/b/c", "0/1024/1"):
        monkeypatch.setenv(ROPE_KV_TILING_ENV, bad)
        with pytest.raises(ValueError, match=ROPE_KV_TILING_ENV):
            _rope_kv_tiling(4096)
