"""pallas.gemv (decode-sized matmuls) against its jnp reference, in Pallas interpret mode."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas.gemv import gemv, gemv_fits, reference_gemv


@pytest.mark.parametrize("m, k, n, k_minor, dtype, splits, fma", [
    (1, 512, 256, False, jnp.bfloat16, 2, False),
    (1, 512, 256, False, jnp.bfloat16, 1, False),  # one row through the dot, written by the kernel
    (1, 768, 256, True, jnp.float8_e4m3fn, 3, False),
    (3, 768, 384, False, jnp.float32, 3, False),
    (2, 512, 256, True, jnp.float8_e4m3fn, 2, False),
    (16, 256, 128, True, jnp.float8_e4m3fn, 1, False),  # one split: the kernel writes the result
    (3, 512, 256, False, jnp.bfloat16, 1, False),
    (1, 512, 256, False, jnp.bfloat16, 1, True),  # multiply-adds, one row
    (1, 512, 256, True, jnp.float8_e4m3fn, 1, True),
    (1, 1024, 384, True, jnp.float8_e4m3fn, 4, True),
    (1, 768, 256, False, jnp.float32, 3, True),
    (1, 512, 256, False, jnp.int8, 2, True),  # int8 [K, N], multiply-adds
])
def test_gemv_matches_reference(m, k, n, k_minor, dtype, splits, fma):
    kx, kw = jax.random.split(jax.random.key(m + k))
    x = jax.random.normal(kx, (m, k), jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)
    w = (jax.random.normal(kw, (n, k) if k_minor else (k, n), jnp.float32) * (50 if dtype == jnp.int8 else 1))
    w = w.clip(-127, 127).astype(dtype)
    scale = jnp.linspace(0.5, 2.0, n) if k_minor or dtype == jnp.int8 else None
    got = gemv(x, w, scale, k_minor=k_minor, block_n=128, block_k=64, splits=splits, fma=fma, interpret=True)
    want = reference_gemv(x, w, scale, k_minor=k_minor)
    assert got.shape == (m, n) and got.dtype == x.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("m, k_minor, dtype, splits, fma", [
    (1, True, jnp.float8_e4m3fn, 4, True),  # fp8 down at one row: multiply-adds, split K
    (1, True, jnp.float8_e4m3fn, 1, True),
    (1, False, jnp.bfloat16, 2, False),  # one row through the dot
    (3, False, jnp.bfloat16, 1, False),  # rows padded to 16
    (1, False, jnp.float32, 1, True),
])
def test_gemv_computes_silu_mul_of_gate_and_up(m, k_minor, dtype, splits, fma):
    """act="silu_mul": x is [m, 2k] (gate, then up) and the kernel multiplies silu(gate) * up --
    an MLP's down projection with no elementwise kernel before it."""
    from jaxllm.pallas.gemv import silu_mul

    k, n = 512, 256
    kx, kw = jax.random.split(jax.random.key(m + splits))
    x = (2 * jax.random.normal(kx, (m, 2 * k), jnp.float32)).astype(jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)
    w = jax.random.normal(kw, (n, k) if k_minor else (k, n), jnp.float32).astype(dtype)
    scale = jnp.linspace(0.5, 2.0, n) if k_minor else None
    got = gemv(x, w, scale, k_minor=k_minor, block_n=128, block_k=64, splits=splits, fma=fma, act="silu_mul",
               interpret=True)
    want = reference_gemv(x, w, scale, k_minor=k_minor, act="silu_mul")
    assert got.shape == (m, n) and got.dtype == x.dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 10)
    g, u = x[:, :k].astype(jnp.float32), x[:, k:].astype(jnp.float32)  # silu written out: g / (1 + e^-g)
    np.testing.assert_allclose(np.asarray(silu_mul(x), np.float32), np.asarray(g / (1 + jnp.exp(-g)) * u),
                               rtol=1e-2, atol=1e-2)
    plain = reference_gemv(x[:, :k], w, scale, k_minor=k_minor)  # not the product of gate alone
    assert not np.allclose(np.asarray(got, np.float32), np.asarray(plain, np.float32), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="act='gelu'"):
        gemv(x, w, scale, k_minor=k_minor, block_n=128, block_k=64, splits=splits, fma=fma, act="gelu", interpret=True)


@pytest.mark.parametrize("unroll", [2, 3, 8])
def test_unrolled_k_loops_and_sums_at_the_end_change_nothing(unroll):
    """unroll (several K steps a loop body; all of them, here 8; 3 leaves steps over) and sum_last
    (per-thread sums reduced once at the end) compute the same one-row fp8 product as the plain loop;
    out_act's gate/up form unrolls too; sum_last refuses what it does not serve."""
    k, n = 512, 64
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(jax.random.key(1), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.linspace(0.5, 1.5, n)
    kw = dict(k_minor=True, fma=True, block_n=2, block_k=64, interpret=True)
    want = reference_gemv(x, w, scale, k_minor=True)
    for splits in (1, 2):
        plain = gemv(x, w, scale, splits=splits, **kw)
        for sum_last in (False, True):
            got = gemv(x, w, scale, splits=splits, unroll=unroll, sum_last=sum_last, **kw)
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(plain, np.float32), rtol=1e-2, atol=1e-2)
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    gated = gemv(x, w, scale, splits=1, out_act="silu_mul", **kw)
    assert gated.shape == (1, n // 2)
    np.testing.assert_array_equal(np.asarray(gemv(x, w, scale, splits=1, out_act="silu_mul", unroll=unroll, **kw)),
                                  np.asarray(gated))
    with pytest.raises(ValueError, match="sum_last"):
        gemv(x, w, scale, splits=1, out_act="silu_mul", sum_last=True, **kw)


@pytest.mark.parametrize("fma", [True, False])
def test_gemv_hands_back_split_k_partials_on_request(fma):
    """partials=True at one row and several splits: the float32 partial sums [S, 1, N], each scaled,
    for a consumer to add (pallas.add_norm); one split or several rows: the usual result."""
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (1, 512), jnp.float32)
    w = jax.random.normal(kw, (256, 512), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jnp.linspace(0.5, 2.0, 256)
    kw = dict(k_minor=True, block_n=128, block_k=64, fma=fma, interpret=True)
    parts = gemv(x, w, scale, splits=4, partials=True, **kw)
    want = reference_gemv(x, w, scale, k_minor=True)
    assert parts.shape == (4, 1, 256) and parts.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert not np.allclose(np.asarray(parts[0]), np.asarray(want), rtol=0.1)  # a quarter of K each
    assert gemv(x, w, scale, splits=1, partials=True, **kw).shape == (1, 256)
    if not fma:
        x3 = jnp.concatenate([x] * 3)
        assert gemv(x3, w, scale, splits=4, partials=True, **kw).shape == (3, 256)


def test_one_row_through_the_dot_needs_no_pad_kernel():
    """One row of x goes to the tensor-core dot broadcast in registers: no pad of x to 16 rows
    before the kernel (a kernel launch per projection at batch 1); more rows are still padded."""
    def names(jaxpr):  # primitives outside the kernel, through nested jits
        for e in jaxpr.eqns:
            yield e.primitive.name
            if e.primitive.name != "pallas_call":
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    yield from names(sub)

    def prims(m):
        x, w = jnp.ones((m, 512), jnp.bfloat16), jnp.ones((512, 256), jnp.bfloat16)
        return set(names(jax.make_jaxpr(lambda x, w: gemv(x, w, block_n=128, block_k=64, splits=1,
                                                              interpret=True))(x, w).jaxpr))

    assert "pad" not in prims(1) and "pad" in prims(2)


@pytest.mark.parametrize("splits, fma", [(1, True), (2, True), (1, False), (2, False)])
def test_gemv_returns_float32_partials_on_request(splits, fma):
    """out_dtype=float32 (a row-parallel shard's partial sum, added before rounding): the float32
    product, not a bfloat16 one widened."""
    x = jax.random.normal(jax.random.key(0), (1, 512), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (256, 512), jnp.float32).astype(jnp.float8_e4m3fn)
    got = gemv(x, w, jnp.linspace(0.5, 2.0, 256), k_minor=True, block_n=128, block_k=64, splits=splits, fma=fma,
               out_dtype=jnp.float32, interpret=True)
    want = reference_gemv(x.astype(jnp.float32), w, jnp.linspace(0.5, 2.0, 256), k_minor=True)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_gemv_refuses_tilings_that_do_not_fit():
    assert gemv_fits(1, 4096, 14336, 128, 64, 4) and not gemv_fits(17, 4096, 14336, 128, 64, 4)
    assert not gemv_fits(1, 4096, 14300, 128, 64, 4) and not gemv_fits(1, 4000, 14336, 128, 64, 4)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(jnp.ones((1, 4000)), jnp.ones((4000, 256)), block_n=128, block_k=64, splits=4, interpret=True)
    with pytest.raises(ValueError, match="one with fma"):  # multiply-adds serve one row only
        gemv(jnp.ones((2, 512)), jnp.ones((512, 256)), block_n=128, block_k=64, splits=1, fma=True, interpret=True)


def test_gemv_tiling_fills_the_gpu_and_fits():
    from jaxllm.pallas.gemv import gemv_tiling

    for m, k, n, itemsize, k_minor in ((1, 4096, 28672, 1, True), (1, 14336, 4096, 2, False), (1, 4096, 1024, 2, False),
                                       (4, 4096, 14336, 2, False), (1, 14336, 4096, 1, False)):
        t = gemv_tiling(m, k, n, itemsize, k_minor)
        assert t["fma"] == (m == 1 and itemsize == 1) and gemv_fits(m, k, n, t["block_n"], t["block_k"], t["splits"])
        assert (n // t["block_n"]) * t["splits"] >= 96  # most SMs get work
    assert gemv_tiling(17, 4096, 4096) is None and gemv_tiling(1, 4096, 4100) is None


def test_wide_fp8_products_read_four_whole_rows_a_program():
    """A one-row fp8 product at least WIDE_N wide with rows of at most 4096 bytes (8B's gate/up, an
    fp8 LM head) takes 4 whole rows a program, one step (40.9 vs 43.6 us on an H100); the long-row
    down projection and narrower ones keep 32-column blocks; the tile computes the same product."""
    from jaxllm.pallas.gemv import WIDE_N, gemv_tiling

    assert gemv_tiling(1, 4096, 28672, 1, True) == dict(block_n=4, block_k=4096, splits=1, fma=True)
    assert gemv_tiling(1, 4096, 128256, 1, True)["block_n"] == 4
    assert gemv_tiling(1, 4096, 28672, 1, True, out_act="silu_mul") == dict(block_n=1, block_k=1024, splits=1,
                                                                          num_warps=1, unroll=4, fma=True)
    assert gemv_tiling(1, 14336, 4096, 1, True, act="silu_mul")["block_n"] == 32  # silu * up once for 32 columns
    narrow = dict(block_n=2, block_k=1024, splits=2, num_warps=1, fma=True)  # plain, narrower than WIDE_N
    assert gemv_tiling(1, 14336, 4096, 1, True) == narrow and gemv_tiling(1, 4096, 6144, 1, True) == narrow
    assert gemv_tiling(1, 4096, WIDE_N // 2, 1, True) == narrow and gemv_tiling(2, 4096, 28672, 1, True)["fma"] is False
    assert gemv_tiling(1, 576, 1536, 1, True)["block_n"] == 32  # K not a multiple of 2048: as before
    x = jax.random.normal(jax.random.key(0), (1, 512), jnp.bfloat16)
    w = (0.05 * jax.random.normal(jax.random.key(1), (64, 512), jnp.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.linspace(0.5, 2.0, 64)
    got = gemv(x, w, scale, k_minor=True, block_n=4, block_k=512, splits=1, fma=True, interpret=True)
    want = reference_gemv(x, w, scale, k_minor=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_gemv_tiling_forced_by_environment(monkeypatch):
    """JAXLLM_GEMV_TILING names a tiling per weight shape (in-model A/Bs); other shapes keep the
    default, and a malformed or non-fitting one is refused naming the variable."""
    from jaxllm.pallas.gemv import gemv_tiling

    default = gemv_tiling(1, 4096, 4096, 1, True)
    monkeypatch.setenv("JAXLLM_GEMV_TILING", "4096x2048=8,2048,1; 4096x4096=32,512,1,8")
    assert gemv_tiling(1, 4096, 2048, 1, True) == dict(block_n=8, block_k=2048, splits=1, fma=True)
    assert gemv_tiling(1, 4096, 4096, 1, True) == dict(block_n=32, block_k=512, splits=1, num_warps=8, fma=True)
    assert gemv_tiling(4, 4096, 4096, 2, False)["fma"] is False
    monkeypatch.setenv("JAXLLM_GEMV_TILING", "4096x2048=8/2048/1")  # "/" for "," (the device scripts' lists)
    assert gemv_tiling(1, 4096, 2048, 1, True) == dict(block_n=8, block_k=2048, splits=1, fma=True)
    assert gemv_tiling(1, 4096, 4096, 1, True) == default
    for bad in ("4096x2048=8,2048", "4096=8,2048,1", "4096x2048=8,0,1", "axb=1,2,3"):
        monkeypatch.setenv("JAXLLM_GEMV_TILING", bad)
        with pytest.raises(ValueError, match="JAXLLM_GEMV_TILING.*KxN=block_n,block_k,splits"):
            gemv_tiling(1, 4096, 2048, 1, True)
    monkeypatch.setenv("JAXLLM_GEMV_TILING", "4096x2048=8,4096,2")
    with pytest.raises(ValueError, match="JAXLLM_GEMV_TILING.*does not fit"):
        gemv_tiling(1, 4096, 2048, 1, True)


def _model_through_gemv(checkpoint, monkeypatch, quantization, modes):
    """{JAXLLM_GEMV mode: (logits of an 8-token call, greedy tokens, [(weight size, fma)] of the
    kernel's calls, [their act])} of the tiny model; "small" caps SMALL_WEIGHT between its weights' sizes."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.pallas import gemv as gemv_module

    ids = jnp.asarray([[5, 9, 17, 33, 2, 71, 8, 100]], jnp.int32)  # 8 tokens: a decode-sized call
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65]}]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    kw = dict(max_seq_len=64, max_batch_size=1, compilation_cache=False, quantization=quantization, dtype="float32")
    results, real = {}, gemv_module.gemv
    for mode in modes:
        monkeypatch.setenv("JAXLLM_GEMV", mode)
        if mode == "small":  # a cap between the tiny model's smallest and largest weight
            sizes = sorted(size for size, _ in results["1"][2])
            monkeypatch.setattr(gemv_module, "SMALL_WEIGHT", sizes[len(sizes) // 2])
        calls, acts = [], []

        def traced(x, w, *a, calls=calls, acts=acts, **k):
            calls.append((w.size, k["fma"]))
            acts.append(k.get("act"))
            return real(x, w, *a, **k)

        monkeypatch.setattr(gemv_module, "gemv", traced)
        with LLM(str(checkpoint), **kw) as llm:
            logits = np.asarray(llm._engine.runner.hidden_states(ids)[1])
            tokens = llm.generate(prompts, sp, use_tqdm=False)[0].outputs[0].token_ids
        results[mode] = (logits, tokens, calls, acts)
    ref, ref_tokens, off_calls, _ = results["0"]
    assert off_calls == []
    for mode in modes[1:]:
        got, got_tokens, _, _ = results[mode]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        assert got_tokens == ref_tokens
    return results


@pytest.mark.parametrize("quantization", [None, "fp8", "int8"])
def test_a_model_through_gemv_gives_the_same_logits_and_tokens(tiny_checkpoints, monkeypatch, quantization):
    """JAXLLM_GEMV=1: every decode-sized projection of the model (plain, fp8 K-minor, int8) runs
    through pallas.gemv (interpret mode on CPU) and gives the XLA path's logits and tokens;
    JAXLLM_GEMV=small: only the weights of at most SMALL_WEIGHT elements do, with the same result."""
    from jaxllm.pallas import gemv as gemv_module

    results = _model_through_gemv(tiny_checkpoints["llama3"], monkeypatch, quantization, ("0", "1", "small"))
    assert len(results["1"][2]) >= 4  # q, k/v, o, gate/up, down: traced through the kernel
    # 8-row calls: a dot; one-row decode: multiply-adds for one-byte weights
    assert {fma for _, fma in results["1"][2]} == ({False, True} if quantization else {False})
    # the down projections took gu and computed silu(gate) * up in the kernel (no elementwise kernel)
    assert "silu_mul" in results["1"][3] and set(results["1"][3]) == {None, "silu_mul"}
    small = [size for size, _ in results["small"][2]]
    assert small and max(small) <= gemv_module.SMALL_WEIGHT < max(size for size, _ in results["1"][2])


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_biased_and_qk_normed_models_through_gemv(tiny_checkpoints, monkeypatch, variant):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms) with fp8 weights: every decode-sized projection
    through the kernel gives the XLA path's logits and tokens."""
    results = _model_through_gemv(tiny_checkpoints[variant], monkeypatch, "fp8", ("0", "1"))
    assert len(results["1"][2]) >= 4


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_the_default_sends_fp8_decode_through_gemv_on_the_gpu(tiny_checkpoints, monkeypatch, quantization):
    """On a GPU the default (JAXLLM_GEMV=auto) runs fp8 weights at one row through the compiled
    multiply-add kernel, with XLA's logits and tokens; int8 stays with XLA."""
    results = _model_through_gemv(tiny_checkpoints["llama3"], monkeypatch, quantization, ("0", "auto"))
    calls = results["auto"][2]
    assert (calls and all(fma for _, fma in calls)) if quantization == "fp8" else calls == []


def test_gemv_mode_is_checked(monkeypatch):
    from jaxllm.pallas.gemv import gemv_wanted

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    for value, mode in (("0", ""), ("1", "all"), ("small", "small"), ("auto", "")):  # auto: GPUs only
        monkeypatch.setenv("JAXLLM_GEMV", value)
        assert gemv_wanted(mesh) == mode
    monkeypatch.delenv("JAXLLM_GEMV")
    assert gemv_wanted(mesh) == ""  # the default is auto
    monkeypatch.setenv("JAXLLM_GEMV", "yes")
    with pytest.raises(ValueError, match="JAXLLM_GEMV='yes'"):
        gemv_wanted(mesh)


def test_auto_takes_the_kernel_on_gpus_with_the_triton_backend_only(monkeypatch):
    """auto on a (stand-in) GPU mesh: fp8 at one row through gemv on one device, the shard's small
    ones under psum (the default on GPUs), nothing on several devices under XLA's partitioner; and nothing at all where
    JAX no longer has the Pallas Triton backend (deprecated upstream)."""
    from conftest import stand_in_mesh as gpus
    from jaxllm.pallas import gemv as gemv_module

    from jaxllm.sharding import row_parallel_mode

    monkeypatch.delenv("JAXLLM_GEMV", raising=False)
    monkeypatch.delenv("JAXLLM_ROW_PARALLEL", raising=False)
    assert gemv_module.gemv_wanted(gpus(1)) == "quantized"
    # the default on GPUs: the projections per shard (psum), the shard's small ones through the kernel
    assert row_parallel_mode(gpus(2)) == "psum" and gemv_module.gemv_wanted(gpus(2)) == "small"
    monkeypatch.setenv("JAXLLM_ROW_PARALLEL", "xla")
    assert gemv_module.gemv_wanted(gpus(2)) == ""
    monkeypatch.setenv("JAXLLM_ROW_PARALLEL", "psum")
    assert gemv_module.gemv_wanted(gpus(2)) == "small"
    monkeypatch.setattr(gemv_module, "triton_available", lambda: False)
    assert gemv_module.gemv_wanted(gpus(1)) == "" and gemv_module.gemv_wanted(gpus(2)) == ""


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, k_minor, dtype", [
    (4096, 14336, False, jnp.bfloat16),  # a tp=2 shard's gate/up
    (7168, 4096, False, jnp.bfloat16),  # its down
    (4096, 28672, True, jnp.float8_e4m3fn),  # fp8 gate/up, stored [N, K]
    (14336, 4096, True, jnp.float8_e4m3fn),  # fp8 down: split K, partials added after
    (4096, 14336, False, jnp.int8),  # int8 [K, N] (its multiply-add tiling, unmeasured)
])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("act", [None, "silu_mul"])
def test_gemv_compiled_on_the_gpu_matches_reference(m, k, n, k_minor, dtype, act):
    """The models' tilings (fma at one row, a tensor-core dot at 4), compiled by Triton; with
    act="silu_mul" x holds gate and up ([m, 2k]) and the kernel multiplies silu(gate) * up."""
    from jaxllm.pallas.gemv import gemv_tiling

    kx, kw = jax.random.split(jax.random.key(k + n + m))
    x = jax.random.normal(kx, (m, k if act is None else 2 * k), jnp.bfloat16)
    w = ((50 if dtype == jnp.int8 else 0.02) * jax.random.normal(kw, (n, k) if k_minor else (k, n), jnp.float32))
    w = w.clip(-127, 127).astype(dtype)
    scale = jnp.full((n,), 0.5 / (2500 if dtype == jnp.int8 else 1), jnp.float32) if k_minor or dtype == jnp.int8 else None
    got = gemv(x, w, scale, k_minor=k_minor, act=act, **gemv_tiling(m, k, n, w.dtype.itemsize, k_minor))
    want = reference_gemv(x, w, scale, k_minor=k_minor, act=act)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(14336, 4096), (4096, 4096)])  # fp8 down and o at batch 1: split K
def test_gemv_partials_compiled_on_the_gpu(k, n):
    """The models' one-row fp8 tiling with partials=True, compiled: [splits, 1, n] float32 partial
    sums (scaled in the kernel) that add up to the product."""
    from jaxllm.pallas.gemv import gemv_tiling

    kx, kw = jax.random.split(jax.random.key(k + n))
    x = jax.random.normal(kx, (1, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(kw, (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.full((n,), 0.5, jnp.float32)
    tiling = gemv_tiling(1, k, n, 1, True)
    assert tiling["splits"] > 1
    parts = gemv(x, w, scale, k_minor=True, partials=True, **tiling)
    assert parts.shape == (tiling["splits"], 1, n) and parts.dtype == jnp.float32
    want = reference_gemv(x, w, scale, k_minor=True)
    np.testing.assert_allclose(np.asarray(parts.sum(0)), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


def test_quantized_mode_takes_fp8_weights_times_one_row():
    """JAXLLM_GEMV=auto on a GPU ("quantized"): fp8 weights (stored [N, K]) at one row go
    through the kernel (with their per-channel scale); int8 ([K, N]: slower than XLA on the H100),
    bf16 weights and more rows stay with XLA (None)."""
    from jaxllm.models.quant import plain_gemv

    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (1, 256), jnp.float32)
    w = jax.random.normal(kw, (128, 256), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jnp.linspace(0.5, 2.0, 128)
    got = plain_gemv("mk,nk->mn", x, w, scale, True, "quantized")
    want = reference_gemv(x, w, scale, k_minor=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert plain_gemv("mk,nk->mn", jnp.ones((2, 256)), w, scale, True, "quantized") is None
    w8 = (20 * jax.random.normal(kw, (256, 128), jnp.float32)).astype(jnp.int8)
    assert plain_gemv("mk,kn->mn", x, w8, scale, False, "quantized") is None
    assert plain_gemv("mk,kn->mn", x, jnp.ones((256, 128), jnp.bfloat16), None, False, "quantized") is None
    with pytest.raises(ValueError, match="mode 'fast' is not 'all', 'small' or 'quantized'"):
        plain_gemv("mk,kn->mn", x, jnp.ones((256, 128)), None, False, "fast")


def _finish_case(k, n, act, seed=0):
    x = jax.random.normal(jax.random.key(seed), (1, k if act is None else 2 * k), jnp.bfloat16)
    w = (0.05 * jax.random.normal(jax.random.key(seed + 1), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
    res = jax.random.normal(jax.random.key(seed + 2), (1, n), jnp.bfloat16)
    return x, w, jnp.linspace(0.5, 2.0, n), res, jnp.linspace(0.8, 1.2, n).astype(jnp.bfloat16)


@pytest.mark.parametrize("act, fma", [(None, True), ("silu_mul", True), (None, False)])
def test_gemv_finishes_the_add_and_norm_in_its_last_program(act, fma):
    """residual / norm_w: the kernel's last program (an atomic count of finished programs) adds the
    split-K partials to the residual and normalizes -- exactly what the partials handed to
    pallas.add_norm.add_rmsnorm give, one kernel instead of two."""
    from jaxllm.pallas.add_norm import add_rmsnorm

    x, w, scale, res, nw = _finish_case(1024, 256, act)
    kw = dict(k_minor=True, block_n=64, block_k=128, splits=4, fma=fma, act=act, interpret=True)
    want = add_rmsnorm(res, gemv(x, w, scale, partials=True, **kw), nw, eps=1e-5, interpret=True)
    got = gemv(x, w, scale, res, nw, eps=1e-5, **kw)
    for a, b in zip(got, want):
        assert a.shape == (1, 256) and a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_gemv_add_norm_epilogue_refuses_what_it_does_not_serve():
    x, w, scale, res, nw = _finish_case(1024, 256, None)
    kw = dict(k_minor=True, block_n=64, block_k=128, fma=True, interpret=True)
    for bad in (dict(splits=1), dict(splits=4, norm_w=None), dict(splits=4, residual=res[:, :128])):
        args = dict(residual=res, norm_w=nw) | {key: v for key, v in bad.items() if key != "splits"}
        with pytest.raises(ValueError, match="add \\+ norm epilogue"):
            gemv(x, w, scale, args["residual"], args["norm_w"], splits=bad["splits"], **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, act", [(4096, 4096, None), (14336, 4096, "silu_mul")])  # o, down at 8B shapes
def test_gemv_add_norm_epilogue_compiled_on_the_gpu(k, n, act):
    """The models' one-row fp8 tilings with the epilogue, compiled: the partials + add_rmsnorm pair to
    within a bf16 rounding (compiled, the two kernels sum the splits and the squares in their own
    orders), over many calls in one program (its counter, one zeroed constant, set back to 0 by each
    call's last program; a memory-ordering slip -- a call that read stale or unwritten partials --
    would be off by the projection's size, not by a rounding)."""
    from jaxllm.pallas.add_norm import add_rmsnorm
    from jaxllm.pallas.gemv import gemv_tiling

    tiling = gemv_tiling(1, k, n, 1, True)
    assert tiling["splits"] > 1
    cases = [_finish_case(k, n, act, seed=3 * i) for i in range(24)]
    f = jax.jit(lambda cs: [gemv(x, w, s, r, nw, k_minor=True, act=act, eps=1e-5, **tiling) for x, w, s, r, nw in cs])
    g = jax.jit(lambda cs: [add_rmsnorm(r, gemv(x, w, s, k_minor=True, act=act, partials=True, **tiling), nw, eps=1e-5)
                            for x, w, s, r, nw in cs])
    for _ in range(3):
        for got, want in zip(f(cases), g(cases)):
            for a, b in zip(got, want):
                a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
                off = np.abs(a - b) > 2 ** -7 * np.abs(b) + 1e-6  # more than one bf16 rounding apart
                assert not off.any(), (f"{off.sum()} of {off.size} off, worst {np.abs(a - b).max()}, "
                                       f"{(a != b).sum()} not bit-equal")


def test_the_add_norm_epilogue_in_the_model_changes_nothing(tiny_checkpoints, monkeypatch):
    """JAXLLM_GEMV_NORM_EPILOGUE=1 (an A/B: measured no faster): batch-1 decode's split-K o and down gemvs
    finish the residual add + RMSNorm in their last program instead of handing their partials to
    pallas.add_norm -- the same tokens and logprobs, exactly (fp8 weights, every projection through
    the kernel in interpret mode, K split in two by a forced tiling at the tiny model's shapes)."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.pallas import gemv as gemv_module

    for var, value in (("JAXLLM_GEMV", "1"), ("JAXLLM_FUSED_NORM", "1"), ("JAXLLM_GEMV_TILING", "128x64=32,32,2")):
        monkeypatch.setenv(var, value)
    real, out = gemv_module.gemv, {}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    for on in ("0", "1"):
        monkeypatch.setenv("JAXLLM_GEMV_NORM_EPILOGUE", on)
        jax.clear_caches()  # the layers' shared jit would keep the other run's trace (the switch is read when tracing)
        finished = []

        def traced(x, w, scale=None, residual=None, *a, finished=finished, **k):
            if residual is not None:
                finished.append(w.shape)
            return real(x, w, scale, residual, *a, **k)

        monkeypatch.setattr(gemv_module, "gemv", traced)
        with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=64, max_batch_size=1, compilation_cache=False,
                 quantization="fp8", dtype="bfloat16") as llm:
            o = llm.generate([{"prompt_token_ids": [3, 14, 15, 92, 65]}], sp, use_tqdm=False)[0].outputs[0]
        out[on] = (o.token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in o.logprobs], finished)
    # where asked, only there: traced, the first layer's o; the shared layer's o and its input norm's (the
    # previous layer's down); the final norm's (the last down) -- o's and down's
    assert not out["0"][2] and len(out["1"][2]) == 4
    assert out["1"][:2] == out["0"][:2]


def test_gate_up_returning_silu_times_up_changes_nothing(tiny_checkpoints, monkeypatch):
    """Batch-1 decode's fp8 gate/up gemv returns silu(gate) * up itself (out_act; the down projection
    then reads it plainly, in narrow blocks): the same tokens and logprobs, exactly, as the gate/up
    product handed to the down projection's act (every projection through the kernel in interpret
    mode)."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.models import quant

    monkeypatch.setenv("JAXLLM_GEMV", "1")
    real, out = quant.plain_gemv, {}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    for fused in (False, True):
        jax.clear_caches()  # the layers' shared jit would keep the other run's trace
        calls = []

        def traced(*a, out_act=None, calls=calls, fused=fused, **k):
            y = real(*a, out_act=out_act if fused else None, **k)
            calls.append(isinstance(y, quant.Activated))
            return y

        monkeypatch.setattr(quant, "plain_gemv", traced)
        with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=64, max_batch_size=1, compilation_cache=False,
                 quantization="fp8", dtype="bfloat16") as llm:
            o = llm.generate([{"prompt_token_ids": [3, 14, 15, 92, 65]}], sp, use_tqdm=False)[0].outputs[0]
        out[fused] = (o.token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in o.logprobs], calls)
    assert not any(out[False][2]) and any(out[True][2])  # the kernel's activation ran where asked, only there
    assert out[True][:2] == out[False][:2]
    monkeypatch.setenv("JAXLLM_GEMV_OUT_ACT", "0")  # the A/B switch: the product alone
    assert real("...e,esf->...sf", jnp.ones((1, 1, 64), jnp.bfloat16), jnp.ones((2, 128, 64), jnp.float8_e4m3fn),
                jnp.ones((2, 128)), True, "quantized", out_act="silu_mul") is None


@pytest.mark.gpu
def test_gate_up_out_act_compiled_on_the_gpu():
    """8B's fp8 gate/up with out_act="silu_mul" at the models' tiling, compiled: silu(gate) * up of
    the reference product within a bf16 rounding or two."""
    from jaxllm.pallas.gemv import gemv_tiling, silu_mul

    k, n = 4096, 28672
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    w = (0.02 * jax.random.normal(jax.random.key(1), (n, k), jnp.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.linspace(0.5, 2.0, n)
    got = gemv(x, w, scale, k_minor=True, out_act="silu_mul", **gemv_tiling(1, k, n, 1, True, out_act="silu_mul"))
    want = silu_mul(reference_gemv(x, w, scale, k_minor=True))
    assert got.shape == (1, n // 2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
