"""The engine's promises: preemption loses nothing, chunked prefill and prefix reuse change no output."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import llm_with_small_pool
from jaxllm import LLM, KvCacheConfig, SamplingParams


@pytest.fixture(scope="module")
def small_pool_llm(tiny_checkpoints):
    """A KV pool of 64 blocks x 16 tokens: far too small for 200 requests of up to 400 tokens."""
    with llm_with_small_pool(tiny_checkpoints["llama3"], 1024, max_seq_len=512, max_batch_size=32, max_num_tokens=256,
                             decode_steps=16) as llm:
        yield llm


def _random_requests(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=int(rng.integers(1, 301))).tolist()} for _ in range(n)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 101)), ignore_eos=True, temperature=0) for _ in range(n)]
    return prompts, params


def test_200_requests_through_a_tiny_pool_preempt_and_lose_nothing(small_pool_llm):
    llm = small_pool_llm
    prompts, params = _random_requests(200, llm.model_config.vocab_size)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.get_stats()
    assert stats[-1]["preemptions"] > 0, "the pool was meant to be too small: no preemption happened"
    assert max(s["kv_blocks_used"] for s in stats) <= 64
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.prompt_token_ids == prompt["prompt_token_ids"]
        assert len(out.outputs[0].token_ids) == sp.max_tokens
        assert out.outputs[0].finish_reason == "length"
    # each request alone (no other request to compete with: no preemption) gives the same tokens
    before = llm.get_stats()[-1]["preemptions"]
    for prompt, sp, out in zip(prompts, params, outs):
        alone = llm.generate(prompt, sp, use_tqdm=False)
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    assert llm.get_stats()[-1]["preemptions"] == before


def test_long_prompt_is_prefilled_in_chunks_with_identical_output(tiny_checkpoints, small_pool_llm):
    vocab = small_pool_llm.model_config.vocab_size
    prompt = {"prompt_token_ids": np.random.default_rng(1).integers(3, vocab, size=450).tolist()}
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    chunked = small_pool_llm.generate(prompt, sp, use_tqdm=False)  # max_num_tokens=256 < 450
    steps = [s for s in small_pool_llm.get_stats() if s["prefill_requests"]][-2:]
    assert len(steps) == 2, "a 450-token prompt with max_num_tokens=256 takes two prefill steps"
    with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=512, max_num_tokens=512) as whole:
        unchunked = whole.generate(prompt, sp, use_tqdm=False)
    assert chunked.outputs[0].token_ids == unchunked.outputs[0].token_ids


def _shared_prefix_run(path, reuse):
    """Two requests sharing a 3-block prefix: (their tokens, prefix-cache hit tokens of the second)."""
    block = 16
    rng = np.random.default_rng(2)
    with LLM(
        str(path),
        max_seq_len=256,
        kv_cache_config=KvCacheConfig(max_tokens=1024, tokens_per_block=block, enable_block_reuse=reuse),
    ) as llm:
        prefix = rng.integers(3, llm.model_config.vocab_size, size=3 * block).tolist()
        a = prefix + rng.integers(3, llm.model_config.vocab_size, size=7).tolist()
        b = prefix + rng.integers(3, llm.model_config.vocab_size, size=11).tolist()
        sp = SamplingParams(max_tokens=20, ignore_eos=True)
        out_a = llm.generate({"prompt_token_ids": a}, sp, use_tqdm=False)
        hits_before = llm.get_stats()[-1]["prefix_cache_hit_tokens"]
        out_b = llm.generate({"prompt_token_ids": b}, sp, use_tqdm=False)
        hits = llm.get_stats()[-1]["prefix_cache_hit_tokens"] - hits_before
    return (out_a.outputs[0].token_ids, out_b.outputs[0].token_ids), hits


def test_shared_prefix_reuses_blocks_and_changes_no_output(tiny_checkpoints):
    on, hits_on = _shared_prefix_run(tiny_checkpoints["llama3"], True)
    off, hits_off = _shared_prefix_run(tiny_checkpoints["llama3"], False)
    assert hits_on == 3 * 16 and hits_off == 0
    assert on == off


def test_first_token_is_published_before_the_next_device_call(small_pool_llm, monkeypatch):
    """A prompt's first token reaches its caller as soon as its prefill is collected, before the
    next (decode) device call is dispatched: on a GPU that call blocks until its whole loop ends,
    so publishing after it would add a full decode call to every TTFT."""
    import time

    engine = small_pool_llm._engine
    dispatches = []
    orig = engine._dispatch_decode

    def wrapped(*a, **k):
        dispatches.append(time.perf_counter())
        return orig(*a, **k)

    monkeypatch.setattr(engine, "_dispatch_decode", wrapped)
    out = small_pool_llm.generate("Hello there", SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 40
    m = out.metrics
    assert dispatches, "the request was meant to decode"
    assert m.arrival_time < m.first_token_time < dispatches[0] < m.finished_time


def test_first_token_of_a_prompt_arriving_mid_decode_precedes_that_steps_decode(small_pool_llm, monkeypatch):
    """A step with a prefill and a decode collects the prefill and publishes its first tokens before
    it dispatches the decode (which blocks on a GPU until its loop ends): under load an arriving
    prompt's TTFT must not include the running rows' decode call."""
    import time

    engine = small_pool_llm._engine
    events = []
    orig_prefill, orig_decode = engine._dispatch_prefill, engine._dispatch_decode

    def prefill(plan):
        events.append(("prefill", time.perf_counter(), [r.request_id for r, _, _ in plan.prefill]))
        return orig_prefill(plan)

    def decode(plan, *a, **k):
        events.append(("decode", time.perf_counter(), [r.request_id for r in plan.decode]))
        return orig_decode(plan, *a, **k)

    monkeypatch.setattr(engine, "_dispatch_prefill", prefill)
    monkeypatch.setattr(engine, "_dispatch_decode", decode)
    greedy = dict(ignore_eos=True, temperature=0)
    a = small_pool_llm.generate_async("a long answer", SamplingParams(max_tokens=300, **greedy))
    deadline = time.time() + 60
    while not any(kind == "decode" for kind, _, _ in events) and time.time() < deadline:
        time.sleep(0.001)
    b = small_pool_llm.generate_async("a late prompt", SamplingParams(max_tokens=4, **greedy))
    out_b, out_a = b.result(timeout=120), a.result(timeout=120)
    assert len(out_a.outputs[0].token_ids) == 300 and len(out_b.outputs[0].token_ids) == 4
    b_id = b.request_id
    i = next(i for i, (kind, _, ids) in enumerate(events) if kind == "prefill" and b_id in ids)
    same_step = events[i + 1]
    assert same_step[0] == "decode" and a.request_id in same_step[2], "b's prefill shared a step with a's decode"
    assert out_b.metrics.first_token_time < same_step[1], "b's first token waited for a's decode call"


def test_decode_state_passed_on_between_calls_is_the_host_built_one(small_pool_llm):
    """Consecutive decode calls of the same rows pass the device state on (no host rebuild): through
    preemption, penalties, banned words, seeded sampling and stop strings, every reused state equals
    the one the host would build, and the outputs equal those of a run that always rebuilds."""
    engine = small_pool_llm._engine
    rng = np.random.default_rng(5)
    vocab = small_pool_llm.model_config.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=int(rng.integers(1, 200))).tolist()} for _ in range(40)]
    kinds = [dict(temperature=0), dict(temperature=0.8, seed=3, top_k=20), dict(temperature=0, repetition_penalty=1.3,
             presence_penalty=0.5), dict(temperature=0.7, seed=9, bad_token_ids=[5, 7], bad=["ab cd"]),
             dict(temperature=0, stop=["ab"], min_tokens=3)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 90)), ignore_eos=True, **kinds[i % len(kinds)])
              for i in range(len(prompts))]

    # a steady batch (the same rows call after call), then a churning one through a too-small pool
    steady = [SamplingParams(max_tokens=80, ignore_eos=True, **kinds[i]) for i in range(len(kinds))]

    def run(reuse):
        engine.reuse_decode_state, engine.check_reused_state = reuse, reuse
        before = engine.num_reused_decode_states
        outs = small_pool_llm.generate(prompts[:5], steady, use_tqdm=False)
        outs += small_pool_llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], engine.num_reused_decode_states - before

    try:
        reused_out, reused = run(True)
        rebuilt_out, none = run(False)
    finally:
        engine.reuse_decode_state, engine.check_reused_state = True, False
    assert reused >= 3 and none == 0, (reused, none)
    assert reused_out == rebuilt_out
    assert engine.scheduler.num_preemptions > 0


def test_device_out_of_memory_says_what_to_change(tiny_llm, monkeypatch):
    """A step program that runs out of device memory (compiling -- XLA's autotuner -- or running)
    reaches the caller as a MemoryError naming the KV fraction to lower; other runtime errors pass
    through as they are."""
    import jax

    from jaxllm.runner.runner import explained_oom

    with pytest.raises(MemoryError, match=r"free_gpu_memory_fraction.*XLA said: RESOURCE_EXHAUSTED: Out of memory"):
        with explained_oom():
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1018.00MiB")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: something else"):
        with explained_oom():
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    runner = tiny_llm._engine.runner
    real = runner._jit_call

    def failing(kind, statics, args):
        fn, fn_args, kwargs = real(kind, statics, args)

        def oom(*a, **kw):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        return oom, fn_args, kwargs

    monkeypatch.setattr(runner, "_jit_call", failing)
    with pytest.raises(MemoryError, match="free_gpu_memory_fraction"):
        runner.call(*tiny_llm._engine._warmup_calls(32, [True])[0])



@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_engine_keeps_the_collector_off_older_objects_only_while_it_works(tiny_checkpoints, monkeypatch, switch):
    """While an engine works, the objects made before it got work (the model, traced programs: a
    full collection of them paused an 8B run ~0.7 s, BENCHMARKS.md "Twentieth session") are frozen
    out of the garbage collector's walks (gc.freeze); when it goes idle they are unfrozen, so nothing
    is left uncollectable. JAXLLM_GC_FREEZE=0: never frozen."""
    import gc
    import time
    import types

    from jaxllm.engine import engine as engine_module

    calls = []
    recording = types.SimpleNamespace(
        freeze=lambda: (gc.freeze(), calls.append(("freeze", gc.get_freeze_count()))),
        unfreeze=lambda: (gc.unfreeze(), calls.append(("unfreeze", gc.get_freeze_count()))))
    monkeypatch.setattr(engine_module, "gc", recording)
    monkeypatch.setenv("JAXLLM_GC_FREEZE", switch)
    with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=64, max_batch_size=2, compilation_cache=False) as llm:
        assert calls == []  # start-up is not work
        for round_ in range(2):
            out = llm.generate([{"prompt_token_ids": [3, 14, 15]}] * 3, SamplingParams(max_tokens=20, ignore_eos=True),
                               use_tqdm=False)
            assert [len(o.outputs[0].token_ids) for o in out] == [20] * 3  # more requests than rows: all done
            for _ in range(500):  # the engine thread goes idle just after publishing the last token
                if len(calls) == 2 * (round_ + 1) or switch == "0":
                    break
                time.sleep(0.01)
            if switch == "1":  # frozen once from work arriving to idle, each time; nothing left frozen
                assert [c[0] for c in calls] == ["freeze", "unfreeze"] * (round_ + 1)
                assert calls[-2][1] > 10_000 and calls[-1][1] == 0  # the older objects, then none
            else:
                assert calls == []
    assert gc.get_freeze_count() == 0
