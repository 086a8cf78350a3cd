"""FP8 KV cache (KvCacheConfig(dtype="fp8")): writes quantize, every read path dequantizes, the pool
holds twice the tokens, and models still answer as with a bfloat16 cache.

The Pallas kernel's fp8 reads are tested in test_pallas_decode.py."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm import LLM, KvCacheConfig, SamplingParams
from jaxllm.runner.paged import make_attend, slots_for, to_pool

FP8 = jnp.float8_e4m3fn


def test_dtype_is_validated_and_mapped():
    with pytest.raises(ValueError, match=r"dtype must be one of \['auto', 'bfloat16', 'float16', 'float32', 'fp8'\], got 'int8'"):
        KvCacheConfig(dtype="int8")
    assert KvCacheConfig(dtype="fp8").pool_dtype(jnp.bfloat16) == jnp.dtype(FP8)
    assert KvCacheConfig().pool_dtype(jnp.bfloat16) == jnp.dtype(jnp.bfloat16)
    assert KvCacheConfig(dtype="float16").pool_dtype(jnp.float32) == jnp.dtype(jnp.float16)


def test_writes_saturate_instead_of_overflowing():
    x = jnp.array([1000.0, -1000.0, 1.3, 0.0, -3e-3], jnp.float32)
    got = np.asarray(to_pool(x, FP8, 0.5).astype(jnp.float32))
    assert np.isfinite(got).all()
    assert got[0] == 448 and got[1] == -448  # clipped, where a plain cast would give NaN
    assert got[2] == pytest.approx(2.6, rel=2**-4) and got[2] != 2.6  # x / scale, rounded to 3 mantissa bits
    assert got[3] == 0


# --- every read path against a float32 attention over the dequantized pool -------------------------
BS, KVH, H, D = 8, 2, 4, 32
SCALES = (0.5, 2.0)  # (k_scale, v_scale), not 1.0: a path that forgot one would be off by 2x


def _expected(q, k_pool, v_pool, table, positions):
    """float32 causal attention of q [T, H, D] at positions over the dequantized pools."""
    ks, vs = SCALES
    slots = (np.asarray(table)[:, None] * BS + np.arange(BS)).reshape(-1)
    k = np.asarray(k_pool.astype(jnp.float32))[slots] * ks  # [S, KVH, D]: position j at index j
    v = np.asarray(v_pool.astype(jnp.float32))[slots] * vs
    g = H // KVH
    out = np.zeros((len(positions), H, D), np.float32)
    for t, p in enumerate(positions):
        for hh in range(H):
            s = k[: p + 1, hh // g] @ np.asarray(q[t, hh], np.float32) / D**0.5
            w = np.exp(s - s.max())
            out[t, hh] = (w / w.sum()) @ v[: p + 1, hh // g]
    return out


def _attend_call(q, k, v, pool, table, positions, **kw):
    pos = jnp.asarray(positions, jnp.int32)[None]
    tables = jnp.asarray([table], jnp.int32)
    slots = slots_for(pos, tables, BS, jnp.ones_like(pos, bool))
    attend = make_attend(pos, slots, tables, BS, kv_scales=[SCALES], **kw)
    out, pool = attend(0, q[None], k[None], v[None], pool)
    return np.asarray(out[0]), pool


def test_writes_quantize_and_every_read_dequantizes():
    rng = np.random.default_rng(0)
    t = 12
    q = jnp.asarray(rng.standard_normal((t, H, D)), jnp.float32)
    k = jnp.asarray(3 * rng.standard_normal((t, KVH, D)), jnp.float32)
    v = jnp.asarray(3 * rng.standard_normal((t, KVH, D)), jnp.float32)
    k = k.at[3, 0, 0].set(1000.0)  # past 448 * k_scale: saturates
    table = [2, 0]  # the sequence's pages, out of order
    empty = [(jnp.zeros((4 * BS, KVH, D), FP8), jnp.zeros((4 * BS, KVH, D), FP8))]

    # whole prompt through the reference path (prefill)
    out, pool = _attend_call(q, k, v, empty, table, range(t))
    k_pool, v_pool = pool[0]
    assert k_pool.dtype == FP8 and v_pool.dtype == FP8
    slots = [table[p // BS] * BS + p % BS for p in range(t)]
    np.testing.assert_array_equal(np.asarray(k_pool[np.array(slots)].astype(jnp.float32)),
                                  np.asarray(to_pool(k, FP8, SCALES[0]).astype(jnp.float32)))
    assert float(k_pool[slots[3], 0, 0].astype(jnp.float32)) == 448
    want = _expected(q, k_pool, v_pool, table, range(t))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)

    # chunked prefill (and a cached prefix): a second chunk reads the first chunk's fp8 K/V
    _, pool = _attend_call(q[:5], k[:5], v[:5], empty, table, range(5))
    out2, pool = _attend_call(q[5:], k[5:], v[5:], pool, table, range(5, t))
    np.testing.assert_allclose(out2, want[5:], rtol=1e-4, atol=1e-4)

    # whole-prompt prefill through jax.nn.dot_product_attention (cuDNN on a GPU) sees the same values
    out3, _ = _attend_call(q, k, v, empty, table, range(t), fresh_impl="xla")
    np.testing.assert_allclose(out3, want, rtol=1e-4, atol=1e-4)

    # and the values are really fp8: attention over the unquantized K/V differs by more than that
    raw = jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    assert np.abs(np.asarray(raw) - want).max() > 1e-3


# --- the engine: capacity, tokens and logprobs against a bfloat16 cache -------------------------
BUDGET = 4 << 20  # bytes the CPU pool may take: binds before the 32768-token default for this model


@pytest.fixture(scope="module")
def llms(tiny_checkpoints):
    """The tiny Llama in bfloat16 with a bfloat16 and with an fp8 KV pool of the same byte budget."""
    import jaxllm.kv_cache_config as kvc

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvc, "CPU_DEFAULT_MAX_BYTES", BUDGET)
        for kv in ("bfloat16", "fp8"):
            out[kv] = LLM(str(tiny_checkpoints["llama3"]), dtype="bfloat16", kv_cache_config=KvCacheConfig(dtype=kv),
                          max_seq_len=256, max_batch_size=4, compilation_cache=False)
    yield out
    for llm in out.values():
        llm.shutdown()


def test_capacity_doubles(llms):
    """Same bytes, twice the tokens: plan_num_blocks divides by the element size. Each pool also
    holds one padding page (init_pool) within the budget, half the bytes in fp8: one block more."""
    bf16, fp8 = llms["bfloat16"], llms["fp8"]
    assert bf16._engine.runner.kv_dtype == jnp.bfloat16 and fp8._engine.runner.kv_dtype == FP8
    bs = bf16._engine.runner.block_size
    assert fp8.kv_capacity_tokens == 2 * bf16.kv_capacity_tokens + bs
    bytes_ = {k: sum(x.nbytes for x in jax.tree.leaves(llm._engine.runner.pool)) for k, llm in llms.items()}
    assert bytes_["fp8"] == bytes_["bfloat16"] <= BUDGET
    blocks = {}
    for kv, llm in llms.items():
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False)
        last = llm.get_stats()[-1]
        blocks[kv] = last["kv_blocks_used"] + last["kv_blocks_free"]
    assert blocks["fp8"] == 2 * blocks["bfloat16"] + 1 == 2 * bf16.kv_capacity_tokens // bs + 1


# Tolerances: e4m3 keeps 3 mantissa bits, so each stored K/V value is off by up to 2^-4 of itself
# (about 2% rms). Scores are sums of 32 such products with random signs and the outputs averages of
# many values, so the errors mostly cancel: measured here, logprobs move by <= 0.007 (mean 0.002).
# 0.05 leaves 7x room yet is far below what a wrong scale or a garbled read gives (> 0.5). This random
# checkpoint's next-token distributions are nearly flat (top-2 margins often < 0.01), so top-1 can
# flip at near-ties: 94% agreement measured, 85% required.
LOGPROB_TOL = 0.05
MIN_AGREEMENT = 0.85


def _top1_and_logprobs(out, seq):
    """Teacher-forced rank-1 tokens and logprobs of seq's tokens from out.prompt_logprobs."""
    top = [next(t for t, lp in d.items() if lp.rank == 1) for d in out.prompt_logprobs[1:]]
    return top, [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], seq[1:])]


def test_prefill_matches_a_bfloat16_cache(llms):
    """Teacher-forced over 4 x 48 random tokens: prompt logprobs read every earlier position's K/V
    back from the pool."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 40000, 48).tolist() for _ in range(4)]
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    res = {kv: llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False) for kv, llm in llms.items()}
    agree, diffs = [], []
    for a, b, s in zip(res["bfloat16"], res["fp8"], seqs):
        (ta, la), (tb, lb) = _top1_and_logprobs(a, s), _top1_and_logprobs(b, s)
        agree += [x == y for x, y in zip(ta, tb)]
        diffs += [abs(x - y) for x, y in zip(la, lb)]
    assert np.mean(agree) >= MIN_AGREEMENT, np.mean(agree)
    assert max(diffs) <= LOGPROB_TOL, max(diffs)
    assert max(diffs) > 0  # the fp8 pool is really in use


def test_decode_matches_a_bfloat16_cache(llms):
    """Tokens the fp8 cache decodes, scored teacher-forced by the bfloat16 cache: the same top-1
    token at most positions and logprobs within tolerance."""
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    outs = llms["fp8"].generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    check = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    scored = llms["bfloat16"].generate([{"prompt_token_ids": s} for s in seqs], check, use_tqdm=False)
    agree, diffs = [], []
    for p, o, ref, s in zip(prompts, outs, scored, seqs):
        top, lps = _top1_and_logprobs(ref, s)
        gen = o.outputs[0].token_ids
        agree += [t == r for t, r in zip(gen, top[len(p) - 1:])]
        diffs += [abs(d[t].logprob - r) for d, t, r in zip(o.outputs[0].logprobs, gen, lps[len(p) - 1:])]
    assert len(agree) == 3 * 24
    assert np.mean(agree) >= MIN_AGREEMENT, np.mean(agree)
    assert max(diffs) <= LOGPROB_TOL, max(diffs)


def test_runner_kv_scales(llms, monkeypatch):
    """Per-layer scales (how a checkpoint's calibrated k/v scales would arrive) reach every attend
    the runner builds; they are checked. (What attend does with them: the test above.)"""
    from flax import nnx

    import jaxllm.runner.runner as runner_mod
    from jaxllm.runner import ModelRunner

    base = llms["fp8"]._engine.runner
    mesh = llms["fp8"]._mesh
    model = nnx.merge(base.graphdef, base.params)
    layers = base.cfg.num_layers

    def runner(scales, kv_dtype=FP8):
        return ModelRunner(model, base.cfg, base.dtype, 8, base.block_size, mesh, kv_dtype, "reference", scales)

    seen = []
    real = runner_mod.make_attend

    def spy(*args, **kw):
        seen.append(args[7] if len(args) > 7 else kw.get("kv_scales"))
        return real(*args, **kw)

    monkeypatch.setattr(runner_mod, "make_attend", spy)
    scales = [(0.7, 1.3), (1.5, 0.6)][:layers] + [(1.0, 1.0)] * (layers - 2)
    tokens = jnp.asarray([list(range(3, 43))], jnp.int32)
    ref = np.asarray(base.hidden_states(tokens)[1], np.float32)
    scaled = np.asarray(runner(scales).hidden_states(tokens)[1], np.float32)
    assert seen[-1] == tuple(scales)
    assert not np.array_equal(scaled, ref)  # the scales changed what was stored ...
    np.testing.assert_allclose(scaled, ref, atol=0.1)  # ... and were undone when read
    with pytest.raises(ValueError, match=f"kv_scales must be {layers} pairs"):
        runner([(1.0, 1.0)] * (layers + 1))
    with pytest.raises(ValueError, match="kv_scales must be .* positive finite"):
        runner([(0.0, 1.0)] * layers)
    with pytest.raises(ValueError, match="kv_scales apply to fp8 KV pools only"):
        runner([(2.0, 1.0)] * layers, jnp.bfloat16)


def test_smollm2_with_fp8_kv_still_answers_paris(smollm2_path):
    with LLM(str(smollm2_path), kv_cache_config=KvCacheConfig(dtype="fp8"), max_seq_len=64, max_batch_size=1,
             compilation_cache=False) as llm:  # small shapes: fewer compilations on this CPU
        assert llm._engine.runner.kv_dtype == FP8
        out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
