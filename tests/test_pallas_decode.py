"""The Pallas paged decode kernel against its jnp reference: on CPU through the Mosaic GPU
interpreter, on an H100 in the `gpu` suite (run through the device tool)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import counting, write_kernel_sized_config
from jaxllm.pallas.decode_attention import paged_decode_attention, reference_decode_attention

TOL = 2e-2  # bf16 kernel vs float32 reference, relative L2 error


def _inputs(seed, b, h, kvh, d, bs, max_len, dtype=jnp.bfloat16, lengths=None):
    """Fresh random q, pools, a random (shuffled, shared-free) block table and lengths."""
    rng = np.random.default_rng(seed)
    w = -(-max_len // bs)
    num_blocks = b * w + 3
    q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((num_blocks * bs, kvh, d)), dtype)
    v = jnp.asarray(rng.standard_normal((num_blocks * bs, kvh, d)), dtype)
    tables = jnp.asarray(rng.permutation(num_blocks)[: b * w].reshape(b, w), jnp.int32)
    if lengths is None:
        lengths = rng.integers(1, max_len + 1, (b,))
        lengths[0] = max_len
    return q, k, v, tables, jnp.asarray(lengths, jnp.int32)


def _fp8_inputs(seed, b, h, kvh, d, bs, max_len, k_scale, v_scale, **kw):
    """As _inputs, with float8_e4m3fn pools holding clip(K / k_scale) and clip(V / v_scale), as the
    runner writes them (K and V drawn 3x wider than q, so the scales matter)."""
    from jaxllm.runner.paged import to_pool

    q, k, v, tables, lens = _inputs(seed, b, h, kvh, d, bs, max_len, dtype=jnp.float32, **kw)
    k8, v8 = to_pool(3 * k, jnp.float8_e4m3fn, k_scale), to_pool(3 * v, jnp.float8_e4m3fn, v_scale)
    return q.astype(jnp.bfloat16), k8, v8, tables, lens


def _check(args, bs, **kw):
    q, k, v, tables, lens = args
    ref_kw = {n: kw[n] for n in ("soft_cap", "sliding_window", "k_scale", "v_scale") if n in kw}
    kk, vv = (k.transpose(1, 0, 2), v.transpose(1, 0, 2)) if kw.get("heads_major") else (k, v)
    out = paged_decode_attention(q, kk, vv, tables, lens, bs, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference_decode_attention(q, k, v, tables, lens, bs, **ref_kw)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
    assert err <= TOL, f"relative error {err:.3g}"
    return err


def _interpret(**kw):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams(**kw)


# (batch, heads, kv_heads, head_dim, block_size, max_len, kernel kwargs)
CPU_GRID = [
    (1, 4, 1, 64, 16, 1, {}),  # a single token of context
    (3, 8, 2, 64, 16, 200, {}),  # GQA 4, several steps, ragged lengths
    (2, 8, 8, 128, 32, 300, {"num_splits": 3}),  # MHA, split-K
    (2, 8, 1, 64, 64, 500, {"num_splits": 2, "max_concurrent_steps": 2}),  # GQA 8, MQA
    (1, 2, 2, 256, 128, 260, {}),  # head dim 256, pages of 128 read in two 64-token copies
    (2, 4, 2, 64, 256, 600, {"sliding_window": 300, "num_splits": 2}),  # four copies per page
    (4, 4, 2, 64, 32, 400, {"sliding_window": 100}),
    (3, 8, 2, 128, 32, 300, {"heads_major": True}),  # pools [kv_heads, slots, head_dim]
    (2, 4, 1, 128, 16, 150, {"soft_cap": 5.0, "block_kv": 128}),
    (3, 8, 2, 64, 16, 200, {"heads_fastest": True}),  # the KV heads the grid's fastest axis
    (2, 8, 8, 128, 32, 300, {"num_splits": 3, "heads_fastest": True}),
]


@pytest.mark.parametrize("case", CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}len{}".format(*c[:6]))
def test_kernel_matches_reference_in_interpret_mode(case):
    b, h, kvh, d, bs, max_len, kw = case
    for seed in range(2):  # fresh inputs each time
        _check(_inputs(seed, b, h, kvh, d, bs, max_len), bs, interpret=_interpret(), **kw)


LOWER_GRID = [
    (b, h, kvh, d, bs, kw)
    for (b, h, kvh, d) in [(64, 32, 8, 128), (1, 8, 8, 64), (3, 16, 2, 256), (5, 56, 7, 128)]
    for bs in (16, 32, 128)
    for kw in ({}, {"p_in_registers": True})
]


def _lower(b, h, kvh, d, bs, kv_dtype=jnp.bfloat16, **kw):
    """The kernel's module lowered for an NVIDIA GPU, as text."""
    w = 4096 // bs
    pool = (kvh, b * w * bs, d) if kw.get("heads_major") else (b * w * bs, kvh, d)
    args = (
        jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16),
        jax.ShapeDtypeStruct(pool, kv_dtype),
        jax.ShapeDtypeStruct(pool, kv_dtype),
        jax.ShapeDtypeStruct((b, w), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    fn = jax.jit(lambda *a: paged_decode_attention(*a, bs, **kw))
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case", LOWER_GRID, ids=str)
def test_kernel_lowers_for_cuda(case):
    """Mosaic GPU's own lowering (layout inference, TMA tiling, the shared-memory budget) runs on
    CPU too: every configuration must lower for an NVIDIA GPU."""
    b, h, kvh, d, bs, kw = case
    text = _lower(b, h, kvh, d, bs, **kw)
    assert "mosaic_gpu" in text and "e4m3" not in text


# -- FP8 pools ---------------------------------------------------------------------------------
FP8_CPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, max_len, k_scale, v_scale, kernel kwargs)
    (3, 8, 2, 64, 16, 200, 0.25, 0.5, {}),  # GQA 4, several steps, ragged lengths; 64-byte rows
    (2, 8, 8, 128, 32, 300, 1.0, 1.0, {"num_splits": 3}),  # MHA, split-K, default scales
    (2, 4, 1, 256, 128, 260, 0.5, 2.0, {"sliding_window": 150}),  # head dim 256, two copies a page
    (3, 8, 2, 128, 32, 300, 2.0, 0.125, {"heads_major": True, "soft_cap": 5.0}),
    (3, 8, 2, 64, 16, 200, 0.25, 0.5, {"heads_fastest": True, "swap_ab": True, "lean_smem": True}),
    (2, 16, 8, 64, 16, 100, 0.5, 2.0, {"heads_fastest": True, "heads_per_program": 2}),
]


@pytest.mark.parametrize("case", FP8_CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}len{}".format(*c[:6]))
def test_fp8_kernel_matches_reference_in_interpret_mode(case):
    """fp8 pools: the kernel (fp8 TMA, f16 staging, scales folded) against the float32 reference on
    the dequantized pools."""
    b, h, kvh, d, bs, max_len, ks, vs, kw = case
    for seed in range(2):
        args = _fp8_inputs(seed, b, h, kvh, d, bs, max_len, ks, vs)
        assert args[1].dtype == jnp.float8_e4m3fn
        _check(args, bs, interpret=_interpret(), k_scale=ks, v_scale=vs, **kw)


def test_fp8_scales_are_applied():
    """A kernel that ignored a scale would miss by far more than the tolerance."""
    args = _fp8_inputs(5, 2, 4, 2, 64, 16, 100, 0.5, 2.0)
    q, k, v, tables, lens = args
    ref = np.asarray(reference_decode_attention(q, k, v, tables, lens, 16, k_scale=0.5, v_scale=2.0))
    for ks, vs in ((1.0, 2.0), (0.5, 1.0)):
        out = np.asarray(paged_decode_attention(q, k, v, tables, lens, 16, k_scale=ks, v_scale=vs,
                                                interpret=_interpret()), np.float32)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) > 10 * TOL


def test_fp8_staging_has_no_races():
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _fp8_inputs(7, 2, 4, 1, 64, 16, 400, 0.5, 0.5)
    for stages in (2, 3):
        _check(args, 16, interpret=_interpret(detect_races=True), max_concurrent_steps=stages, k_scale=0.5,
               v_scale=0.5)
        assert not get_races().races_found


FP8_LOWER_GRID = [
    (b, h, kvh, d, bs, kw)
    for (b, h, kvh, d) in [(64, 32, 8, 128), (1, 8, 8, 64), (3, 16, 2, 256)]
    for bs in (16, 128)
    for kw in ({}, {"p_in_registers": True, "heads_major": True})
]


@pytest.mark.parametrize("case", FP8_LOWER_GRID, ids=str)
def test_fp8_kernel_lowers_for_cuda(case):
    """fp8 pools lower for an NVIDIA GPU, converting with the fp8 -> f16 cvt (never through f32)."""
    b, h, kvh, d, bs, kw = case
    text = _lower(b, h, kvh, d, bs, jnp.float8_e4m3fn, k_scale=0.5, v_scale=2.0, **kw)
    assert "mosaic_gpu" in text and "cvt.rn.f16x2.e4m3x2" in text


def test_no_races_in_the_stage_ring():
    """The interpreter's race detector follows every TMA copy and barrier of the refill scheme."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _inputs(7, 2, 4, 1, 64, 16, 400)  # 7 steps through a ring of 2 and 3 stages
    for stages in (2, 3):
        _check(args, 16, interpret=_interpret(detect_races=True), max_concurrent_steps=stages)
        assert not get_races().races_found


def test_split_choice():
    """Splits fill the SMs at batch 1 on long contexts, but none is shorter than MIN_SPLIT_STEPS
    steps (a short context is one split: no merge); a full batch needs no split at all."""
    from jaxllm.pallas.decode_attention import MIN_SPLIT_STEPS, _choose_splits

    assert _choose_splits(1, 8, 5) == 1  # ~300 tokens at batch 1
    assert _choose_splits(1, 8, 2 * MIN_SPLIT_STEPS) == 2
    assert _choose_splits(1, 8, 128) == 128 // MIN_SPLIT_STEPS  # 8k tokens: 16 splits x 8 KV heads
    assert _choose_splits(1, 8, 4096) == 33  # 2 x 132 SMs / 8 programs
    assert _choose_splits(64, 8, 128) == 1


def test_bad_arguments_are_refused():
    q, k, v, tables, lens = _inputs(0, 1, 6, 4, 64, 16, 32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q, k, v, tables, lens, 16)
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 48, 16, 32)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 64"):
        paged_decode_attention(q, k, v, tables, lens, 16)
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 64, 16, 32, dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16, float16 or float8_e4m3fn"):
        paged_decode_attention(q, k, v, tables, lens, 16)
    with pytest.raises(ValueError, match="both pools alike"):
        paged_decode_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.float8_e4m3fn), tables, lens, 16)
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 256, 16, 32)
    with pytest.raises(ValueError, match="block_kv=128 with head_dim 256"):
        paged_decode_attention(q, k, v, tables, lens, 16, block_kv=128)
    q, k, v, tables, lens = _inputs(0, 1, 4, 2, 64, 16, 32)
    with pytest.raises(ValueError, match="block_kv must be a multiple of 64"):
        paged_decode_attention(q, k, v, tables, lens, 16, block_kv=96)


@pytest.mark.parametrize("kv,hpp,swap", [("auto", "1", "0"), ("fp8", "1", "0"), ("fp8", "2", "0"), ("fp8", "1", "1"),
                                         ("auto", "2", "1")])
def test_engine_decodes_through_the_kernel(tmp_path, monkeypatch, kv, hpp, swap):
    """The runner's decode path with the (interpreted) kernel gives the reference path's tokens
    (fp8: over an fp8 pool with per-layer scales that are not 1; hpp: the kernel's KV heads per
    program, JAXLLM_ATTN_HEADS_PER_PROGRAM; swap: JAXLLM_ATTN_SWAP_AB, with JAXLLM_ATTN_LEAN_SMEM and
    JAXLLM_ATTN_K_REGS set to the same value -- K_REGS never reaches an interpreted call, which
    cannot feed a wgmma from registers: test_runner_passes_k_in_registers_on_gpu has the GPU side)."""
    from jaxllm.pallas import decode_attention

    monkeypatch.setenv("JAXLLM_ATTN_HEADS_PER_PROGRAM", hpp)
    monkeypatch.setenv("JAXLLM_ATTN_SWAP_AB", swap)
    monkeypatch.setenv("JAXLLM_ATTN_LEAN_SMEM", swap)
    monkeypatch.setenv("JAXLLM_ATTN_K_REGS", swap)
    grids = []
    real_kernel = decode_attention.paged_decode_attention
    monkeypatch.setattr(decode_attention, "paged_decode_attention",
                        lambda *a, **kw: grids.append((kw["heads_per_program"], kw["swap_ab"], kw["lean_smem"],
                                                       kw["k_in_registers"]))
                        or real_kernel(*a, **kw))
    expected, got, traced = engine_tokens_through_the_kernel(tmp_path, kv, _interpret())
    assert traced and all(shape[1:] == (4, 64) for shape in traced)  # decode went through the kernel
    assert grids and set(grids) == {(int(hpp), swap == "1", swap == "1", False)}
    assert got == expected


def engine_tokens_through_the_kernel(tmp_path, kv: str, interpret):
    """(the reference path's tokens, the tokens with decode through the runner's decode kernel, the
    shapes of q it was traced with) for two greedy prompts of a kernel-sized random Llama (fp8 pools:
    per-layer scales that are not 1); `interpret`: decode_kernel_for's."""
    from jaxllm import LLM, KvCacheConfig, SamplingParams
    from jaxllm.runner.paged import decode_kernel_for

    write_kernel_sized_config(tmp_path)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=2, decode_steps=3, compilation_cache=False,
              kv_cache_config=KvCacheConfig(dtype=kv))
    scales = ((0.7, 1.3), (1.5, 0.6)) if kv == "fp8" else None  # set before the first compilation
    with LLM(str(tmp_path), **kw) as ref_llm:
        if scales:
            ref_llm._engine.runner.kv_scales = scales
        expected = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, sp, use_tqdm=False)]
    with LLM(str(tmp_path), **kw) as llm:
        runner = llm._engine.runner
        assert runner.attention_backend == "reference"  # CPU: "auto" picks the reference
        assert runner.pool[0][0].dtype == (jnp.float8_e4m3fn if kv == "fp8" else jnp.bfloat16)
        if scales:
            runner.kv_scales = scales
        traced = []
        runner._decode_kernel = counting(decode_kernel_for(runner.block_size, None, llm._mesh, interpret=interpret),
                                         traced)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    return expected, got, traced


def test_heads_per_program_switch(monkeypatch):
    """JAXLLM_ATTN_HEADS_PER_PROGRAM: 1 by default, N forced (capped at the device's KV heads), auto
    the kernel's proposal; other values are refused naming the switch."""
    from jaxllm.runner.paged import attention_heads_per_program as hpp

    monkeypatch.delenv("JAXLLM_ATTN_HEADS_PER_PROGRAM", raising=False)
    assert hpp(1024, 8) == 1 and hpp(1, 8) == 1
    monkeypatch.setenv("JAXLLM_ATTN_HEADS_PER_PROGRAM", "4")
    assert hpp(1, 8) == 4 and hpp(1, 2) == 2
    monkeypatch.setenv("JAXLLM_ATTN_HEADS_PER_PROGRAM", "auto")
    assert hpp(1024, 8) == 8 and hpp(1, 8) == 1
    for bad, match in (("0", "positive integer"), ("two", "positive integer"), ("3", "does not divide the 8")):
        monkeypatch.setenv("JAXLLM_ATTN_HEADS_PER_PROGRAM", bad)
        with pytest.raises(ValueError, match=f"JAXLLM_ATTN_HEADS_PER_PROGRAM='{bad}'.*{match}"):
            hpp(64, 8)


def test_auto_picks_the_kernel_for_fp8_pools_on_a_gpu():
    """pallas_decode_supported: fp8 pools are served by the kernel; float32 pools are not."""
    from types import SimpleNamespace

    from jaxllm.runner.paged import pallas_decode_supported

    cfg = SimpleNamespace(head_dim=128, num_kv_heads=8)
    gpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]), shape={})
    assert pallas_decode_supported(cfg, jnp.float8_e4m3fn, gpu, 32) is None
    assert pallas_decode_supported(cfg, jnp.bfloat16, gpu, 32) is None
    assert "float32" in pallas_decode_supported(cfg, jnp.float32, gpu, 32)
    cpu = SimpleNamespace(devices=np.array([SimpleNamespace(platform="cpu")]), shape={})
    assert "NVIDIA GPUs" in pallas_decode_supported(cfg, jnp.float8_e4m3fn, cpu, 32)


def test_pallas_backend_is_refused_where_it_cannot_run(tiny_checkpoints):
    from jaxllm import LLM

    with pytest.raises(ValueError, match="attention_backend must be one of"):
        LLM(str(tiny_checkpoints["llama3"]), attention_backend="triton")
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(ValueError, match="attention_backend='pallas' is not available: the Pallas kernels run on NVIDIA GPUs"):
            LLM(str(tiny_checkpoints["llama3"]), attention_backend="pallas")


# -- several KV heads per program (heads_per_program) -------------------------------------------
HPP_CPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, lengths, kernel kwargs)
    (3, 8, 4, 64, 16, (200, 1, 77), {"heads_per_program": 2}),  # a 1-token sequence, ragged lengths
    (2, 8, 4, 64, 16, (300, 40), {"heads_per_program": 4, "num_splits": 3}),  # all heads; empty splits
    (2, 12, 4, 64, 32, (250, 130), {"heads_per_program": 2, "sliding_window": 100, "max_concurrent_steps": 3}),
    (2, 8, 4, 64, 16, (150, 20), {"heads_per_program": 2, "heads_major": True, "block_kv": 128}),
    # G = 33: two heads' 66 rows exceed the 64-row Q tile, so each head loads its own
    (2, 66, 2, 64, 16, (150, 70), {"heads_per_program": 2}),
]


@pytest.mark.parametrize("case", HPP_CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}".format(*c[:5]) + "-hpp{}".format(
    c[6]["heads_per_program"]))
def test_heads_per_program_matches_reference_in_interpret_mode(case):
    """Several KV heads per program, the ring running on across heads: one Q tile for the program
    (G = 2, 3 at any row offset r0) or one per head (G = 33), splits that are empty for a sequence."""
    b, h, kvh, d, bs, lengths, kw = case
    _check(_inputs(0, b, h, kvh, d, bs, max(lengths), lengths=lengths), bs, interpret=_interpret(), **kw)


FP8_HPP_CPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, lengths, k_scale, v_scale, kernel kwargs)
    (3, 8, 2, 64, 16, (200, 1, 90), 0.5, 2.0, {"heads_per_program": 2, "max_concurrent_steps": 3}),
    (2, 16, 8, 64, 32, (150, 60), 1.0, 1.0, {"heads_per_program": 8, "num_splits": 2, "sliding_window": 64}),
    (2, 8, 4, 64, 16, (120, 50), 0.25, 0.5, {"heads_per_program": 4, "soft_cap": 5.0}),
]


@pytest.mark.parametrize("case", FP8_HPP_CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}".format(*c[:5]) + "-hpp{}".format(
    c[8]["heads_per_program"]))
def test_fp8_heads_per_program_matches_reference_in_interpret_mode(case):
    b, h, kvh, d, bs, lengths, ks, vs, kw = case
    args = _fp8_inputs(1, b, h, kvh, d, bs, max(lengths), ks, vs, lengths=lengths)
    _check(args, bs, interpret=_interpret(), k_scale=ks, v_scale=vs, **kw)


def test_heads_per_program_is_the_default_for_one():
    """heads_per_program=1 is the default kernel: the same values, bit for bit."""
    args = _inputs(3, 2, 8, 2, 64, 16, 100)
    q, k, v, tables, lens = args
    a = paged_decode_attention(q, k, v, tables, lens, 16, interpret=_interpret())
    b = paged_decode_attention(q, k, v, tables, lens, 16, heads_per_program=1, interpret=_interpret())
    assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_no_races_across_heads_in_the_ring():
    """The race detector follows the ring across the head boundary (the next head's first pages in
    flight while the last steps of this one run), the output tiles reused head after head, and
    (G = 33) the per-head Q loads."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _inputs(7, 2, 4, 2, 64, 16, 200, lengths=(200, 90))  # 4 + 2 steps per head
    for stages in (2, 3):
        _check(args, 16, interpret=_interpret(detect_races=True), max_concurrent_steps=stages, heads_per_program=2)
        assert not get_races().races_found
    args = _fp8_inputs(7, 1, 66, 2, 64, 16, 130, 0.5, 0.5)
    _check(args, 16, interpret=_interpret(detect_races=True), heads_per_program=2, k_scale=0.5, v_scale=0.5)
    assert not get_races().races_found


@pytest.mark.parametrize("case", [(64, 32, 8, 128, 16, 8, {}), (64, 32, 8, 128, 16, 2, {"p_in_registers": True}),
                                  (5, 56, 7, 128, 32, 7, {}), (3, 80, 2, 64, 16, 2, {"p_in_registers": True})], ids=str)
def test_heads_per_program_lowers_for_cuda(case):
    """Several heads per program lower for an NVIDIA GPU, bf16 and fp8 pools, one Q tile per program
    or (G = 40) one per head."""
    b, h, kvh, d, bs, hpp, kw = case
    assert "mosaic_gpu" in _lower(b, h, kvh, d, bs, heads_per_program=hpp, **kw)
    text = _lower(b, h, kvh, d, bs, jnp.float8_e4m3fn, heads_per_program=hpp, k_scale=0.5, **kw)
    assert "cvt.rn.f16x2.e4m3x2" in text


def test_bad_heads_per_program_is_refused():
    q, k, v, tables, lens = _inputs(0, 1, 16, 8, 64, 16, 32)
    for bad in (0, 3, 16, -2, 2.0):
        with pytest.raises(ValueError, match=r"heads_per_program must divide the KV heads \(8\): "
                                             r"one of \[1, 2, 4, 8\]"):
            paged_decode_attention(q, k, v, tables, lens, 16, heads_per_program=bad)


def test_heads_per_program_choice():
    """A full batch of programs serves several heads each; a small batch needs every program."""
    from jaxllm.pallas.decode_attention import choose_heads_per_program

    assert choose_heads_per_program(1, 8, 1) == 1
    assert choose_heads_per_program(64, 8, 1) == 1
    assert choose_heads_per_program(1024, 8, 1) > 1
    assert 8 % choose_heads_per_program(1024, 8, 1) == 0
    assert choose_heads_per_program(256, 8, 1) == 2  # 1024 programs of 2 heads >= 4 x 132


# -- GPU suite ---------------------------------------------------------------------------------
GPU_GRID = [  # (batch, heads, kv heads, head dim, block size, context)
    (1, 32, 8, 128, 32, 1),
    (1, 32, 8, 128, 16, 32768),
    (1, 8, 8, 64, 128, 20000),
    (7, 32, 8, 128, 32, 3000),
    (7, 16, 2, 256, 128, 3000),
    (7, 32, 4, 128, 16, 3000),
    (64, 32, 8, 128, 32, 2048),
    (64, 8, 8, 64, 16, 2048),
    (64, 16, 2, 256, 32, 2048),
    (256, 32, 8, 128, 32, 512),
    (256, 32, 4, 128, 128, 512),
    (32, 32, 8, 128, 32, 8192),
    (32, 16, 2, 256, 64, 8192),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}ctx{}".format(*c))
def test_kernel_matches_reference_on_gpu(case):
    b, h, kvh, d, bs, ctx = case
    _check(_inputs(hash(case) % 2**31, b, h, kvh, d, bs, ctx), bs)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"p_in_registers": True}, {"sliding_window": 1000}, {"soft_cap": 30.0},
                                {"num_splits": 1}, {"max_concurrent_steps": 4}, {"block_kv": 128}], ids=str)
def test_kernel_variants_on_gpu(kw):
    for seed in range(2):
        _check(_inputs(seed, 16, 32, 8, 128, 32, 4000), 32, **kw)



@pytest.mark.gpu
@pytest.mark.parametrize("hpp", [2, 8])
@pytest.mark.parametrize("kw", [{}, {"p_in_registers": True}, {"sliding_window": 1000}, {"num_splits": 4},
                                {"max_concurrent_steps": 4}, {"block_kv": 128}], ids=str)
def test_heads_per_program_variants_on_gpu(hpp, kw):
    """test_kernel_variants_on_gpu with several KV heads per program, bf16 and fp8 pools, and the
    throughput shape's short contexts (block size 16, ~150 tokens)."""
    for seed in range(2):
        _check(_inputs(seed, 16, 32, 8, 128, 32, 4000), 32, heads_per_program=hpp, **kw)
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0,
               heads_per_program=hpp, **kw)
    _check(_fp8_inputs(2, 256, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, heads_per_program=hpp,
           **kw)

FP8_GPU_GRID = [  # (batch, heads, kv heads, head dim, block size, context, k_scale, v_scale)
    (1, 32, 8, 128, 32, 1, 1.0, 1.0),
    (1, 32, 8, 128, 16, 32768, 0.5, 2.0),
    (1, 8, 8, 64, 128, 20000, 1.0, 1.0),
    (7, 16, 2, 256, 128, 3000, 0.25, 0.5),
    (64, 32, 8, 128, 32, 2048, 1.0, 1.0),
    (64, 8, 8, 64, 16, 2048, 2.0, 0.125),
    (256, 32, 8, 128, 32, 512, 1.0, 1.0),
    (32, 16, 2, 256, 64, 8192, 0.5, 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FP8_GPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}ctx{}".format(*c[:6]))
def test_fp8_kernel_matches_reference_on_gpu(case):
    b, h, kvh, d, bs, ctx, ks, vs = case
    _check(_fp8_inputs(hash(case) % 2**31, b, h, kvh, d, bs, ctx, ks, vs), bs, k_scale=ks, v_scale=vs)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"p_in_registers": True}, {"sliding_window": 1000}, {"soft_cap": 30.0},
                                {"num_splits": 1}, {"max_concurrent_steps": 4}, {"block_kv": 128},
                                {"heads_major": True}], ids=str)
def test_fp8_kernel_variants_on_gpu(kw):
    for seed in range(2):
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0, **kw)


@pytest.mark.gpu
def test_llm_with_fp8_kv_uses_the_kernel_on_gpu(tmp_path):
    """On a GPU "auto" serves an fp8 pool with the kernel, and its tokens follow the reference
    backend's over the same fp8 pool."""
    from jaxllm import LLM, KvCacheConfig, SamplingParams

    write_kernel_sized_config(tmp_path, hidden_size=512, intermediate_size=512, num_attention_heads=8, head_dim=128,
                              max_position_embeddings=1024, vocab_size=512)  # the 300-token prompt's ids < 512
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 300, 40)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(load_format="dummy", dtype="bfloat16", max_batch_size=4, compilation_cache=False,
              kv_cache_config=KvCacheConfig(dtype="fp8", max_tokens=8192))
    with LLM(str(tmp_path), attention_backend="reference", **kw) as ref_llm:
        expected = ref_llm.generate(prompts, sp, use_tqdm=False)
    with LLM(str(tmp_path), attention_backend="pallas", **kw) as llm:  # explicit while fp8 decode is unverified
        assert llm._engine.runner._decode_kernel is not None
        got = llm.generate(prompts, sp, use_tqdm=False)
    for e, g in zip(expected, got):
        lp = [x[t].logprob for x, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        ref = [x[t].logprob for x, t in zip(e.outputs[0].logprobs, e.outputs[0].token_ids)]
        n = next((i for i, (a, b) in enumerate(zip(e.outputs[0].token_ids, g.outputs[0].token_ids)) if a != b), 16)
        # the same tokens up to a divergence, which may only be a near-tie: there each side's greedy
        # token has (nearly) the same logprob
        assert lp[: n + 1] == pytest.approx(ref[: n + 1], abs=0.05), (n, e.outputs[0].token_ids, g.outputs[0].token_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{"swap_ab": True}, {"swap_ab": True, "k_in_registers": True},
                                {"swap_ab": True, "lean_smem": True},
                                {"swap_ab": True, "k_in_registers": True, "lean_smem": True}], ids=str)
def test_fp8_forms_at_the_engine_tests_shape_on_gpu(kw):
    """The fp8 forms the engine runs, at test_llm_with_fp8_kv_uses_the_kernel_on_gpu's shape: 4 rows
    (3 ragged sequences of 21 / 316 / 56 tokens and a padding row of 1), 8 query / 2 KV heads of 128,
    16-token pages, split-K chosen by the kernel."""
    for seed in range(3):
        _check(_fp8_inputs(seed, 4, 8, 2, 128, 16, 320, 0.5, 2.0, lengths=[21, 316, 56, 1]), 16, k_scale=0.5,
               v_scale=2.0, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"swap_ab": True, "k_in_registers": True, "lean_smem": True}], ids=str)
def test_heads_fastest_on_gpu(kw):
    """The grid with the KV heads fastest, at the throughput shape (1024 sequences, ~160 tokens in
    16-token pages) over bf16 and fp8 pools, and split-K at a long context."""
    if kw:
        _check(_fp8_inputs(4, 1024, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, heads_fastest=True,
               **kw)
    else:
        _check(_inputs(4, 1024, 32, 8, 128, 16, 160), 16, heads_fastest=True)
        _check(_inputs(5, 4, 32, 8, 128, 32, 8000), 32, heads_fastest=True, num_splits=8)


@pytest.mark.gpu
def test_heads_major_layout_on_gpu():
    q, k, v, tables, lens = _inputs(3, 16, 32, 8, 128, 32, 4000)
    out = paged_decode_attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), tables, lens, 32, heads_major=True)
    ref = reference_decode_attention(q, k, v, tables, lens, 32)
    out = np.asarray(out, np.float32)
    assert np.linalg.norm(out - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)) <= TOL


def test_fresh_prefill_through_dot_product_attention(tiny_checkpoints):
    """Whole-prompt prefill through jax.nn.dot_product_attention (XLA on CPU; cuDNN on a GPU)
    gives the reference path's tokens and logprobs, chunked and cached prompts included."""
    from jaxllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 33)]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(max_batch_size=4, max_num_tokens=64, compilation_cache=False, max_seq_len=256)
    with LLM(str(tiny_checkpoints["llama3"]), **kw) as ref_llm:
        expected = ref_llm.generate(prompts, sp, use_tqdm=False)
    with LLM(str(tiny_checkpoints["llama3"]), **kw) as llm:
        runner = llm._engine.runner
        assert runner._fresh_impl is None  # CPU: the reference path unless asked
        runner._fresh_impl = "xla"
        calls = []
        orig = runner._prefill

        def spy(*a, **k):
            calls.append(k.get("fresh"))
            return orig(*a, **k)

        runner._prefill = spy
        got = llm.generate(prompts, sp, use_tqdm=False)
        again = llm.generate(prompts, sp, use_tqdm=False)  # cached prefixes: not fresh
    assert True in calls and False in calls
    for e, g, a in zip(expected, got, again):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids == a.outputs[0].token_ids
        lp = [x[t].logprob for x, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        ref = [x[t].logprob for x, t in zip(e.outputs[0].logprobs, e.outputs[0].token_ids)]
        assert lp == pytest.approx(ref, abs=1e-4)



def test_kernel_serves_kv_heads_fewer_than_devices():
    """2 KV heads at tensor_parallel_size=4: the pool keeps one copy of each KV head per device that
    reads it (pool head j = KV head j // 2), so each device runs the kernel on its 2 query heads and
    its 1 pool head. Emulated device by device (the interpreter runs one device at a time): the
    concatenated results equal the reference over the 2-head pool; and the GPU check accepts the
    layout (it refuses only replicated pools). The engine side (writing the copies; tokens and
    float32 logits equal to tp=1) is tests/test_tensor_parallel.py."""
    from types import SimpleNamespace

    from jaxllm.runner.paged import pallas_decode_supported, pool_kv_heads

    tp, heads, kv = 4, 8, 2
    q, k, v, tables, lens = _inputs(3, 3, heads, kv, 64, 16, 80)
    shapes = SimpleNamespace(head_dim=64, num_kv_heads=kv, num_heads=heads)
    assert pool_kv_heads(shapes, tp) == tp
    k_dup, v_dup = (jnp.repeat(x, tp // kv, axis=1) for x in (k, v))  # what the runner's write stores
    per_device = [
        paged_decode_attention(q[:, d * heads // tp:(d + 1) * heads // tp], k_dup[:, d:d + 1], v_dup[:, d:d + 1],
                               tables, lens, 16, interpret=_interpret())
        for d in range(tp)
    ]
    got = np.asarray(jnp.concatenate(per_device, axis=1), np.float32)
    want = np.asarray(reference_decode_attention(q, k, v, tables, lens, 16), np.float32)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 2e-2

    def gpu(n):
        return SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]), shape={"model": n})

    assert pallas_decode_supported(shapes, jnp.bfloat16, gpu(tp), 16) is None
    # 8 query heads over 16 devices: replicated, and so is the pool: the kernel cannot split it
    assert pool_kv_heads(shapes, 16) == kv
    assert "replicated" in pallas_decode_supported(shapes, jnp.bfloat16, gpu(16), 16)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("which", ["decode", "prefill"])
def test_layers_share_one_lowering_of_the_kernel(which, tp):
    """The runner's kernel wrappers are jitted, so the layers of one step program share one
    lowering of the kernel (one Mosaic GPU module in a function each layer calls), also per device
    under tensor parallelism. Lowered inline, every layer lowered and compiled a copy of its own:
    42 s per 8B decode program instead of 7 s."""
    from jaxllm.runner.paged import decode_kernel_for, prefill_kernel_for
    from jaxllm.sharding import make_meshes

    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices (the full suite forces 8 CPU devices)")
    mesh = make_meshes(tensor_parallel=tp)[0]
    pool = jax.ShapeDtypeStruct((64 * 16, 2, 64), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((2,), jnp.int32)
    tables = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    if which == "decode":
        kernel = decode_kernel_for(16, None, mesh)
        args = (jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16), pool, pool, tables, rows)
    else:
        kernel = prefill_kernel_for(16, None, mesh)
        args = (jax.ShapeDtypeStruct((2, 16, 8, 64), jnp.bfloat16), pool, pool, tables, rows, rows)

    def three_layers(q, *rest):
        return sum(kernel(q + i, *rest, 1.0, 1.0).astype(jnp.float32) for i in range(3))

    text = jax.jit(three_layers).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    assert text.count("call @") >= 3 + 1  # three calls of the kernel's function, plus its custom call


@pytest.mark.parametrize("switches,want", [({}, (True, True, False)), ({"JAXLLM_ATTN_K_REGS": "0"}, (False, True, False)),
                                           ({"JAXLLM_ATTN_LEAN_SMEM": "0"}, (True, False, False)),
                                           ({"JAXLLM_ATTN_SWAP_AB": "0"}, (False, True, False)),
                                           ({"JAXLLM_ATTN_HEADS_FASTEST": "1"}, (True, True, True))], ids=str)
def test_runner_passes_k_in_registers_on_gpu(monkeypatch, switches, want):
    """Lowered for CUDA (not interpreted), the runner's decode kernel over an fp8 pool gets
    k_in_registers and lean_smem by default (the pair measured fastest, BENCHMARKS.md twenty-second
    session), each switched off by its variable; k_in_registers needs swap_ab. A bf16 pool gets
    neither (lean_smem only when its variable says 1). JAXLLM_ATTN_HEADS_FASTEST=1 (an A/B, off by
    default) reaches both. Both lower for CUDA with those arguments."""
    from jaxllm.pallas import decode_attention
    from jaxllm.runner.paged import decode_kernel_for
    from jaxllm.sharding import make_meshes

    for name in ("JAXLLM_ATTN_K_REGS", "JAXLLM_ATTN_LEAN_SMEM", "JAXLLM_ATTN_SWAP_AB", "JAXLLM_ATTN_TRITON",
                 "JAXLLM_ATTN_HEADS_FASTEST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    seen = []
    real_kernel = decode_attention.paged_decode_attention
    monkeypatch.setattr(decode_attention, "paged_decode_attention",
                        lambda *a, **kw: seen.append((kw["k_in_registers"], kw["lean_smem"], kw["heads_fastest"]))
                        or real_kernel(*a, **kw))
    mesh = make_meshes(tensor_parallel=1)[0]
    rows = jax.ShapeDtypeStruct((2,), jnp.int32)
    tables = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    texts = {}
    for dtype in (jnp.float8_e4m3fn, jnp.bfloat16):
        pool = jax.ShapeDtypeStruct((64 * 16, 2, 64), dtype)
        kernel = decode_kernel_for(16, None, mesh)
        args = (jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16), pool, pool, tables, rows)
        texts[dtype] = jax.jit(lambda *a: kernel(*a, 0.5, 2.0)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert seen == [want, (False, switches.get("JAXLLM_ATTN_LEAN_SMEM") == "1", want[2])]
    assert all("custom_call @mosaic_gpu" in text for text in texts.values())


# -- lean_smem: one fp8 staging tile, scoped loop / epilogue buffers (three programs an SM) -------
LEAN_CPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, lengths, fp8, kernel kwargs)
    (2, 8, 2, 64, 16, (150, 40), True, {}),
    (2, 8, 2, 64, 16, (150, 40), False, {}),
    (3, 8, 2, 64, 16, (200, 1, 90), True, {"heads_per_program": 2, "max_concurrent_steps": 3}),
    (2, 16, 8, 64, 32, (150, 60), True, {"num_splits": 2, "sliding_window": 64, "soft_cap": 5.0}),
    (2, 8, 4, 64, 16, (150, 20), True, {"heads_major": True, "block_kv": 128}),
]


def _check_grid_case(case, **extra):
    """One (batch, heads, kv_heads, head_dim, block_size, lengths, fp8, kernel kwargs) case of the
    layout grids below, in interpret mode against the reference (fp8: scales 0.5 and 2)."""
    b, h, kvh, d, bs, lengths, fp8, kw = case
    if fp8:
        args = _fp8_inputs(4, b, h, kvh, d, bs, max(lengths), 0.5, 2.0, lengths=lengths)
        _check(args, bs, interpret=_interpret(), k_scale=0.5, v_scale=2.0, **extra, **kw)
    else:
        _check(_inputs(4, b, h, kvh, d, bs, max(lengths), lengths=lengths), bs, interpret=_interpret(), **extra, **kw)


def _assert_no_races(kw_sets, **extra):
    """The race detector over fp8 pools (2 x 200 / 90 tokens), one run per kernel kwargs set."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _fp8_inputs(7, 2, 8, 2, 64, 16, 200, 0.5, 0.5, lengths=(200, 90))
    for kw in kw_sets:
        _check(args, 16, interpret=_interpret(detect_races=True), k_scale=0.5, v_scale=0.5, **extra, **kw)
        assert not get_races().races_found, kw


@pytest.mark.parametrize("case", LEAN_CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}".format(*c[:5]) + ("-fp8" if c[6] else ""))
def test_lean_smem_matches_reference_in_interpret_mode(case):
    _check_grid_case(case, lean_smem=True)


def test_lean_smem_has_no_races():
    """K and V converted into the one staging tile step after step, and the epilogue's O over the
    loop's bytes: the race detector finds nothing (one and two heads per program, two and three stages)."""
    _assert_no_races(({"max_concurrent_steps": 2}, {"max_concurrent_steps": 3}, {"heads_per_program": 2}),
                     lean_smem=True)


def test_lean_smem_fits_three_programs_an_sm():
    """The throughput shape (fp8, head_dim 128, block_kv 64, two stages) drops from two programs an
    SM to three; bf16 is unchanged in count (its stages are most of it)."""
    from jaxllm.pallas.decode_attention import SMEM_BYTES, _smem_besides_stages

    def per_sm(kv_bytes, lean, p_in_registers=False, hpp=1):
        stages = 2 * 2 * 64 * 128 * kv_bytes
        return SMEM_BYTES // (stages + _smem_besides_stages(128, 64, p_in_registers, kv_bytes, lean, hpp) + 1024)

    assert per_sm(1, False) == 2 and per_sm(1, True) == 3 and per_sm(1, True, True) == 3
    assert per_sm(1, True, hpp=2) == 2  # several heads per program keep O beside the loop's buffers
    assert per_sm(2, True) == per_sm(2, False) == 2


@pytest.mark.parametrize("kw", [{}, {"p_in_registers": True}, {"heads_per_program": 2}], ids=str)
def test_lean_smem_lowers_for_cuda(kw):
    assert "mosaic_gpu" in _lower(64, 32, 8, 128, 16, lean_smem=True, **kw)
    assert "cvt.rn.f16x2.e4m3x2" in _lower(64, 32, 8, 128, 16, jnp.float8_e4m3fn, k_scale=0.5, lean_smem=True, **kw)


@pytest.mark.parametrize("name", ["JAXLLM_ATTN_LEAN_SMEM", "JAXLLM_ATTN_SWAP_AB", "JAXLLM_ATTN_K_REGS"])
def test_decode_kernel_switches(monkeypatch, name):
    """swap_ab, k_in_registers and (over fp8 pools) lean_smem on by default, lean_smem off over
    16-bit pools; 1 turns it on, 0 off, anything else is refused naming the switch."""
    from jaxllm.runner import paged

    read = {"JAXLLM_ATTN_LEAN_SMEM": paged.attention_lean_smem, "JAXLLM_ATTN_SWAP_AB": paged.attention_swap_ab,
            "JAXLLM_ATTN_K_REGS": paged.attention_k_in_registers}[name]
    monkeypatch.delenv(name, raising=False)
    assert read() is True
    if name == "JAXLLM_ATTN_LEAN_SMEM":
        assert paged.attention_lean_smem(False) is False
        monkeypatch.setenv(name, "1")
        assert paged.attention_lean_smem(False) is True
    monkeypatch.setenv(name, "1")
    assert read() is True
    monkeypatch.setenv(name, "0")
    assert read() is False
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}='yes': expected 0 or 1"):
        read()


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"p_in_registers": True}, {"heads_per_program": 2}, {"max_concurrent_steps": 3},
                                {"num_splits": 4}], ids=str)
def test_lean_smem_on_gpu(kw):
    for seed in range(2):
        _check(_inputs(seed, 16, 32, 8, 128, 32, 4000), 32, lean_smem=True, **kw)
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0, lean_smem=True,
               **kw)
    _check(_fp8_inputs(2, 1024, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, lean_smem=True, **kw)


@pytest.mark.parametrize("kw", [{}, {"heads_per_program": 2}, {"max_concurrent_steps": 3, "lean_smem": True}], ids=str)
def test_page_ids_read_ahead_change_nothing(kw):
    """prefetch_pages (the refills' page ids read a step ahead, the default) gives the values of the
    ids read at each refill, bit for bit, over shuffled pages and past the table's end; no races."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    q, k, v, tables, lens = _fp8_inputs(5, 2, 8, 2, 64, 16, 260, 0.5, 0.5, lengths=(260, 33))
    a = paged_decode_attention(q, k, v, tables, lens, 16, k_scale=0.5, interpret=_interpret(detect_races=True), **kw)
    assert not get_races().races_found
    b = paged_decode_attention(q, k, v, tables, lens, 16, k_scale=0.5, prefetch_pages=False, interpret=_interpret(),
                               **kw)
    assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("kw", [{}, {"heads_per_program": 2, "max_concurrent_steps": 3},
                                {"num_splits": 2, "sliding_window": 64, "soft_cap": 5.0}], ids=str)
def test_early_v_matches_reference_without_races(kw):
    """early_v (fp8: V converted while the tensor cores run Q K^T) against the reference, the race
    detector watching the staging tiles; with lean_smem it changes nothing (one staging tile)."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    args = _fp8_inputs(6, 2, 8, 2, 64, 16, 230, 0.5, 2.0, lengths=(230, 70))
    _check(args, 16, interpret=_interpret(detect_races=True), k_scale=0.5, v_scale=2.0, early_v=True, **kw)
    assert not get_races().races_found
    q, k, v, tables, lens = args
    a, b = (paged_decode_attention(q, k, v, tables, lens, 16, k_scale=0.5, lean_smem=True, early_v=e,
                                   interpret=_interpret(), **kw) for e in (True, False))
    assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("kw", [{}, {"p_in_registers": True}, {"heads_per_program": 8}], ids=str)
def test_early_v_lowers_for_cuda(kw):
    assert "cvt.rn.f16x2.e4m3x2" in _lower(64, 32, 8, 128, 16, jnp.float8_e4m3fn, k_scale=0.5, early_v=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"p_in_registers": True}, {"heads_per_program": 2}, {"num_splits": 4},
                                {"prefetch_pages": False}], ids=str)
def test_early_v_and_page_prefetch_on_gpu(kw):
    for seed in range(2):
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0, early_v=True, **kw)
    _check(_fp8_inputs(2, 1024, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, early_v=True, **kw)
    _check(_inputs(3, 1024, 32, 8, 128, 16, 160), 16, **kw)


# -- swap_ab: S^T = K Q^T and O^T = V^T P^T, the query rows on the wgmma's N -------------------------
SWAP_CPU_GRID = [  # (batch, heads, kv_heads, head_dim, block_size, lengths, fp8, kernel kwargs)
    (3, 8, 2, 64, 16, (200, 1, 90), False, {}),
    (3, 8, 2, 64, 16, (200, 1, 90), True, {}),
    (3, 8, 2, 64, 16, (200, 1, 90), True, {"heads_per_program": 2, "max_concurrent_steps": 3, "lean_smem": True}),
    (3, 8, 2, 64, 16, (200, 1, 90), True, {"num_splits": 2, "sliding_window": 64, "soft_cap": 5.0, "early_v": True}),
    (3, 8, 2, 64, 16, (200, 1, 90), False, {"heads_major": True, "block_kv": 128}),
    (2, 12, 4, 64, 32, (150, 60), False, {"heads_per_program": 2}),  # G = 3: rows at offsets 0..5 of 8
    (2, 66, 2, 64, 16, (150, 70), False, {"heads_per_program": 2}),  # G = 33: N = 40, one Q load a head
]


@pytest.mark.parametrize("case", SWAP_CPU_GRID, ids=lambda c: "b{}h{}kv{}d{}bs{}".format(*c[:5]) + ("-fp8" if c[6] else "")
                         + "".join(f"-{k}" for k in c[7]))
def test_swap_ab_matches_reference_in_interpret_mode(case):
    _check_grid_case(case, swap_ab=True)


def test_swap_ab_has_no_races():
    _assert_no_races(({}, {"max_concurrent_steps": 3, "lean_smem": True}, {"heads_per_program": 2, "early_v": True}),
                     swap_ab=True)


@pytest.mark.parametrize("kw", [{}, {"lean_smem": True}, {"heads_per_program": 8}, {"block_kv": 128, "num_splits": 4}],
                         ids=str)
def test_swap_ab_lowers_for_cuda(kw):
    assert "mosaic_gpu" in _lower(64, 32, 8, 128, 16, swap_ab=True, **kw)
    assert "cvt.rn.f16x2.e4m3x2" in _lower(64, 32, 8, 128, 16, jnp.float8_e4m3fn, k_scale=0.5, swap_ab=True, **kw)


def test_swap_ab_tiles_and_refusals():
    """The query tile shrinks to the rows the heads need (8 for Llama's G = 4 at any offset, so a
    program's shared memory drops below three an SM's share); P in registers is refused."""
    from jaxllm.pallas.decode_attention import SMEM_BYTES, _smem_besides_stages

    fp8_stages = 2 * 2 * 64 * 128
    assert SMEM_BYTES // (fp8_stages + _smem_besides_stages(128, 64, False, 1, False, 1, 8) + 1024) == 3
    assert SMEM_BYTES // (fp8_stages + _smem_besides_stages(128, 64, False, 1, True, 1, 8) + 1024) == 4
    q, k, v, tables, lens = _inputs(0, 2, 8, 2, 64, 16, 40)
    with pytest.raises(ValueError, match="swap_ab takes P from shared memory"):
        paged_decode_attention(q, k, v, tables, lens, 16, swap_ab=True, p_in_registers=True, interpret=_interpret())


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"lean_smem": True}, {"heads_per_program": 2}, {"num_splits": 4},
                                {"max_concurrent_steps": 3}, {"block_kv": 128}, {"sliding_window": 1000},
                                {"soft_cap": 30.0}], ids=str)
def test_swap_ab_on_gpu(kw):
    for seed in range(2):
        _check(_inputs(seed, 16, 32, 8, 128, 32, 4000), 32, swap_ab=True, **kw)
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0, swap_ab=True, **kw)
    _check(_fp8_inputs(2, 1024, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, swap_ab=True, **kw)
    _check(_inputs(3, 1, 32, 8, 128, 16, 20000), 16, swap_ab=True, **kw)


# -- k_in_registers: swap_ab's K tile converted in registers and fed to the wgmma from there ----------
@pytest.mark.parametrize("kw", [{}, {"lean_smem": True}, {"heads_per_program": 2}, {"max_concurrent_steps": 3},
                                {"num_splits": 4, "sliding_window": 1000}], ids=str)
def test_k_in_registers_lowers_for_cuda(kw):
    """Mosaic GPU's layout inference takes the 8-bit load in the upcasting layout, the conversion and
    the relayout to the wgmma's A fragments (the CPU interpreter cannot feed a wgmma from registers,
    so the numbers are checked on a GPU: test_k_in_registers_on_gpu)."""
    text = _lower(64, 32, 8, 128, 16, jnp.float8_e4m3fn, k_scale=0.5, swap_ab=True, k_in_registers=True, **kw)
    assert "mosaic_gpu" in text and "cvt.rn.f16x2.e4m3x2" in text


def test_k_in_registers_smem_and_refusals():
    """No staging tile for K: swap_ab's fp8 program fits four an SM (three with K staged); refused
    without swap_ab or over 16-bit pools, naming the argument."""
    from jaxllm.pallas.decode_attention import SMEM_BYTES, _smem_besides_stages

    fp8_stages = 2 * 2 * 64 * 128
    staged = _smem_besides_stages(128, 64, False, 1, False, 1, 8)
    in_regs = _smem_besides_stages(128, 64, False, 1, False, 1, 8, k_in_registers=True)
    assert staged - in_regs == 64 * 128 * 2
    assert SMEM_BYTES // (fp8_stages + in_regs + 1024) == 4
    q, k, v, tables, lens = _inputs(0, 2, 8, 2, 64, 16, 40)
    with pytest.raises(ValueError, match="k_in_registers needs swap_ab=True and float8_e4m3fn pools"):
        paged_decode_attention(q, k, v, tables, lens, 16, swap_ab=True, k_in_registers=True, interpret=_interpret())
    f8 = jnp.float8_e4m3fn
    with pytest.raises(ValueError, match="got swap_ab=False and float8_e4m3fn"):
        paged_decode_attention(q, k.astype(f8), v.astype(f8), tables, lens, 16, k_in_registers=True,
                               interpret=_interpret())


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"lean_smem": True}, {"heads_per_program": 2}, {"num_splits": 4},
                                {"max_concurrent_steps": 3}, {"sliding_window": 1000}, {"soft_cap": 30.0}], ids=str)
def test_k_in_registers_on_gpu(kw):
    for seed in range(2):
        _check(_fp8_inputs(seed, 16, 32, 8, 128, 32, 4000, 0.5, 2.0), 32, k_scale=0.5, v_scale=2.0, swap_ab=True,
               k_in_registers=True, **kw)
    _check(_fp8_inputs(2, 1024, 32, 8, 128, 16, 160, 0.5, 2.0), 16, k_scale=0.5, v_scale=2.0, swap_ab=True,
           k_in_registers=True, **kw)


# -- Q's padding: only as far as the furthest Q box reaches --------------------------------------------
@pytest.mark.parametrize("b,h,kvh,swap", [(1, 32, 8, True), (1024, 32, 8, True), (3, 12, 4, True), (2, 66, 2, True),
                                          (5, 56, 7, True), (1, 8, 8, True), (1, 32, 8, False), (3, 16, 2, False)])
def test_q_padding_covers_every_q_box(b, h, kvh, swap):
    """Every program's Q box [q_start, q_start + rows) -- q_start the 8-aligned start of its KV
    head's first query row, any head (several heads per program load theirs one by one) -- lies
    within the padded Q rows; none are added where swap_ab's 8-row boxes fit (Llama's 32 heads), so
    the kernel's q is no copy (no pad in the lowered program)."""
    from jaxllm.pallas.decode_attention import ROWS, _max_r0

    g = h // kvh
    rows = -(-(_max_r0(h, g) + g) // 8) * 8 if swap else ROWS
    ends = [(s * h + k * g) // 8 * 8 + rows for s in range(b) for k in range(kvh)]
    q_end = (b * h - g) // 8 * 8 + rows  # what paged_decode_attention pads to
    assert max(ends) == q_end
    d, bs = 64, 16
    text = _lower(b, h, kvh, d, bs, jnp.float8_e4m3fn, swap_ab=swap) if h // kvh <= 64 else ""
    if text:
        assert ("stablehlo.pad" in text) == (q_end > b * h)
    if swap and h % 8 == 0 and g <= 8:
        assert q_end <= b * h
