"""generate_async and the engine thread: streaming, asyncio and threads, fairness to new requests,
abort, failure of a step, shutdown with requests in flight."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from jaxllm import LLM, EngineDeadError, SamplingParams

DECODE_STEPS = 4


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)


def _engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "jaxllm-engine" and t.is_alive()}


def _wait_idle(llm: LLM, timeout: float = 30.0) -> None:
    """Wait until the engine has nothing queued or running (read from this thread: poll)."""
    engine = llm._engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._lock:
            busy = bool(engine._incoming or engine._aborts)
        if not busy and not engine.scheduler.has_work:
            time.sleep(0.05)  # let a step in progress publish and record its stats
            if not engine.scheduler.has_work:
                return
        time.sleep(0.01)
    pytest.fail("the engine did not become idle")


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    """Few tokens per device call (so streams have many steps) and room for 16 running requests."""
    llm = LLM(str(tiny_checkpoints["llama3"]), max_seq_len=256, max_batch_size=16, decode_steps=DECODE_STEPS)
    yield llm
    llm.shutdown()


# -- streaming -----------------------------------------------------------------------------------
def test_streaming_partials_add_up_to_the_final_output(llm):
    prompt = "The capital of France is"
    sp = _greedy(40)
    expected = llm.generate(prompt, sp, use_tqdm=False).outputs[0]
    assert len(expected.token_ids) == 40

    async def consume():
        h = llm.generate_async(prompt, sp, streaming=True)
        return h, [p async for p in h]

    h, partials = asyncio.run(consume())
    final = partials[-1]
    assert final.finished and final.outputs[0].finish_reason == "length"
    assert [p.finished for p in partials] == [False] * (len(partials) - 1) + [True], "only the last is final"
    text = "".join(p.outputs[0].text_diff for p in partials)
    tokens = [t for p in partials for t in p.outputs[0].token_ids_diff]
    assert tokens == final.outputs[0].token_ids == expected.token_ids
    assert text == final.outputs[0].text == expected.text
    assert expected.text, "the tiny model's 40 tokens decode to some text"
    # one partial per engine step: the prefill's token, then at most decode_steps tokens per step
    assert len(partials[0].outputs[0].token_ids_diff) == 1
    assert all(1 <= len(p.outputs[0].token_ids_diff) <= DECODE_STEPS for p in partials)
    assert len(partials) >= 1 + -(-39 // DECODE_STEPS)
    # each partial carries everything so far, and the request id of its handle
    seen = []
    for p in partials:
        seen += p.outputs[0].token_ids_diff
        assert p.outputs[0].token_ids == seen
        assert p.request_id == h.request_id
    assert h.finished and h.result(timeout=1) == final


def test_non_streaming_handles_give_the_final_output_once(llm):
    prompt = "Hello, my name is"
    sp = _greedy(24)
    expected = llm.generate(prompt, sp, use_tqdm=False).outputs[0]

    async def run():
        a = await llm.generate_async(prompt, sp).aresult()
        items = [o async for o in llm.generate_async(prompt, sp)]
        return a, items

    a, items = asyncio.run(run())
    b = llm.generate_async(prompt, sp).result(timeout=60)
    assert len(items) == 1 and items[0].finished, "a non-streaming handle yields only its final output"
    for out in (a, b, items[0]):
        assert out.finished
        assert out.outputs[0].token_ids == expected.token_ids
        assert out.outputs[0].text == expected.text
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids_diff == expected.token_ids, "a single output's diff is all of it"


def _prompts(n: int, tag: str) -> list[str]:
    return [f"{tag} request {i}: once upon a time there was" + " a" * (i % 7) for i in range(n)]


def test_many_concurrent_asyncio_tasks(llm):
    prompts = _prompts(20, "asyncio")
    params = [_greedy(8 + 3 * (i % 6)) for i in range(20)]
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def one(p, sp):
        return await llm.generate_async(p, sp).aresult()

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params))), 120)

    outs = asyncio.run(run())
    for p, sp, out, exp in zip(prompts, params, outs, expected):
        assert out.prompt == p
        assert out.outputs[0].token_ids == exp.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == sp.max_tokens
    assert len({o.request_id for o in outs}) == 20


def test_generate_async_from_several_threads(llm):
    n_threads, per_thread = 4, 5
    prompts = _prompts(n_threads * per_thread, "threaded")
    params = [_greedy(6 + 2 * (i % 5)) for i in range(len(prompts))]
    expected = llm.generate(prompts, params, use_tqdm=False)
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t):
        try:
            barrier.wait(timeout=30)
            idx = range(t * per_thread, (t + 1) * per_thread)
            handles = {i: llm.generate_async(prompts[i], params[i]) for i in idx}
            for i, h in handles.items():
                results[i] = h.result(timeout=120)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == list(range(len(prompts)))
    for i, exp in enumerate(expected):
        assert results[i].prompt == prompts[i]
        assert results[i].outputs[0].token_ids == exp.outputs[0].token_ids
    assert len({r.request_id for r in results.values()}) == len(prompts), "request ids stay unique"


# -- a new request joins while others decode -----------------------------------------------------
def test_new_request_gets_its_first_token_before_long_ones_finish(llm):
    long_sp, short_sp = _greedy(200), _greedy(6)
    short_prompt = "A short question:"

    async def run():
        events: list[tuple] = []
        longs = [llm.generate_async(f"long story {i} begins", long_sp, streaming=True) for i in range(6)]
        started = [asyncio.Event() for _ in longs]

        async def consume_long(i, h):
            async for p in h:
                started[i].set()
                if p.finished:
                    events.append(("long_done", i, time.monotonic()))

        tasks = [asyncio.create_task(consume_long(i, h)) for i, h in enumerate(longs)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        assert not any(h.finished for h in longs), "precondition: the long requests are still decoding"
        short = llm.generate_async(short_prompt, short_sp, streaming=True)
        long_done_at_first = None
        short_partials = []
        async for p in short:
            if not short_partials:
                events.append(("short_first", time.monotonic()))
                long_done_at_first = [h.finished for h in longs]
                long_tokens_at_first = [len(h._outputs[-1].outputs[0].token_ids) for h in longs]
            short_partials.append(p)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return events, long_done_at_first, long_tokens_at_first, short_partials, longs

    events, long_done_at_first, long_tokens_at_first, short_partials, longs = asyncio.run(run())
    kinds = [e[0] for e in events]
    assert kinds.count("long_done") == 6 and kinds.count("short_first") == 1
    assert kinds.index("short_first") < kinds.index("long_done"), f"the short request waited: {kinds}"
    assert long_done_at_first == [False] * 6
    assert all(n < 200 for n in long_tokens_at_first)
    for h in longs:
        assert len(h.result(timeout=1).outputs[0].token_ids) == 200
    # joining a running batch changes nothing in the short request's output
    alone = llm.generate(short_prompt, short_sp, use_tqdm=False).outputs[0]
    assert short_partials[-1].outputs[0].token_ids == alone.token_ids


# -- abort ---------------------------------------------------------------------------------------
def test_abort_100_requests_cancels_ten_and_leaves_the_rest_exact(llm):
    rng = np.random.default_rng(0)
    vocab = llm.model_config.vocab_size
    n = 100
    aborted = [0, 5, 11, 15, 30, 47, 62, 77, 88, 99]  # the first four are admitted at once (16 slots)
    prompts = [{"prompt_token_ids": rng.integers(3, vocab, size=int(rng.integers(1, 40))).tolist()} for _ in range(n)]
    params = [_greedy(60 if i in aborted else int(rng.integers(30, 61))) for i in range(n)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(e.outputs[0].token_ids) == sp.max_tokens for e, sp in zip(expected, params))

    steps_before = len(llm.get_stats())
    handles = [llm.generate_async(p, sp) for p, sp in zip(prompts, params)]
    for i in aborted:
        handles[i].abort()
    t0 = time.monotonic()
    outs = [h.result(timeout=120) for h in handles]
    assert time.monotonic() - t0 < 120
    assert max(s["running"] for s in llm.get_stats()[steps_before:]) <= 16

    for i, (out, exp, sp) in enumerate(zip(outs, expected, params)):
        got, want = out.outputs[0], exp.outputs[0]
        assert out.finished
        if i in aborted:
            assert got.finish_reason == "cancelled", i
            assert len(got.token_ids) < sp.max_tokens
            assert got.token_ids == want.token_ids[: len(got.token_ids)], "what an aborted request made is exact"
        else:
            assert got.finish_reason == "length", i
            assert got.token_ids == want.token_ids, i

    _wait_idle(llm)
    assert llm._engine.blocks.num_used == 0, "every KV block must be free once the engine is idle"
    assert llm.get_stats()[-1]["kv_blocks_used"] == 0

    # aborting finished requests (again, or for the first time) is harmless
    for h in handles:
        h.abort()
    handles[1].abort()
    assert handles[1].result(timeout=1) is outs[1]
    again = llm.generate(prompts[0], params[0], use_tqdm=False)  # the engine serves new work
    assert again.outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert again.outputs[0].finish_reason == "length"
    _wait_idle(llm)
    assert llm._engine.blocks.num_used == 0


def test_abort_a_streaming_request_mid_decode(llm):
    prompt = "Tell me a very long story about"
    sp = _greedy(200)
    expected = llm.generate(prompt, sp, use_tqdm=False).outputs[0]

    async def run():
        h = llm.generate_async(prompt, sp, streaming=True)
        partials = []
        async for p in h:
            partials.append(p)
            if len(partials) == 3:
                h.abort()
        return h, partials

    h, partials = asyncio.run(asyncio.wait_for(run(), 60))
    final = partials[-1]
    assert final.finished and final.outputs[0].finish_reason == "cancelled"
    assert not any(p.finished for p in partials[:-1])
    got = final.outputs[0].token_ids
    assert 3 <= len(got) < 200
    assert got == expected.token_ids[: len(got)]
    assert [t for p in partials for t in p.outputs[0].token_ids_diff] == got
    assert h.result(timeout=1).outputs[0].finish_reason == "cancelled"


# -- failure and shutdown ------------------------------------------------------------------------
def test_a_failing_step_fails_every_request_and_kills_the_engine(tiny_checkpoints, monkeypatch):
    before = _engine_threads()
    llm = LLM(str(tiny_checkpoints["llama3"]), max_seq_len=128, max_batch_size=4, decode_steps=DECODE_STEPS)
    thread = llm._engine._thread
    assert thread in _engine_threads()

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(llm._engine.runner, "decode", boom)
    sp = _greedy(20)
    # 6 requests on 4 slots: some run (prefill works, their first decode fails), some wait
    handles = [llm.generate_async(f"failing request {i}", sp) for i in range(6)]
    stream = llm.generate_async("failing stream", sp, streaming=True)
    t0 = time.monotonic()
    for h in handles:
        with pytest.raises(RuntimeError) as info:
            h.result(timeout=30)
        err = info.value
        assert "injected failure" in str(err) or "injected failure" in str(err.__cause__)
        assert not isinstance(err, TimeoutError)

    async def consume():
        return [p async for p in stream]

    with pytest.raises(RuntimeError, match="injected failure"):
        asyncio.run(asyncio.wait_for(consume(), 30))
    with pytest.raises(RuntimeError, match="injected failure"):
        asyncio.run(asyncio.wait_for(handles[0].aresult(), 30))
    assert time.monotonic() - t0 < 20, "the failure must reach the callers promptly"

    assert issubclass(EngineDeadError, RuntimeError)
    with pytest.raises(EngineDeadError, match="dead"):
        llm.generate("x", use_tqdm=False)
    with pytest.raises(EngineDeadError, match="dead"):
        llm.generate_async("x")
    llm.shutdown()
    assert not thread.is_alive()
    assert _engine_threads() <= before, "shutdown must leave no engine thread of this LLM"


def test_shutdown_with_requests_in_flight_cancels_them(tiny_checkpoints, monkeypatch):
    before = _engine_threads()
    llm = LLM(str(tiny_checkpoints["llama3"]), max_seq_len=256, max_batch_size=2, decode_steps=DECODE_STEPS)
    thread = llm._engine._thread
    runner = llm._engine.runner
    real_decode = runner.decode

    def slow_decode(*args, **kwargs):  # keeps the requests in flight for far longer than the test
        time.sleep(0.05)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(runner, "decode", slow_decode)
    sp = _greedy(200)

    async def run():
        # 2 run (and stream), 2 wait for a slot, 1 is a plain handle nobody iterates
        streams = [llm.generate_async(f"endless story {i}", sp, streaming=True) for i in range(4)]
        plain = llm.generate_async("endless plain story", sp)
        first = [asyncio.Event() for _ in streams]

        async def consume(i, h):
            outs = []
            async for p in h:
                outs.append(p)
                first[i].set()
            return outs

        tasks = [asyncio.create_task(consume(i, h)) for i, h in enumerate(streams)]
        await asyncio.wait_for(asyncio.gather(first[0].wait(), first[1].wait()), 60)
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(llm.shutdown), 30)
        shutdown_s = time.monotonic() - t0
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return streams, plain, outs, shutdown_s

    streams, plain, outs, shutdown_s = asyncio.run(run())
    assert shutdown_s < 10
    for h, o in zip(streams + [plain], outs + [None]):
        final = h.result(timeout=5)
        assert final.finished and final.outputs[0].finish_reason == "cancelled", "nothing is silently dropped"
        assert len(final.outputs[0].token_ids) < 200
        if o is not None:
            assert o[-1].finished and o[-1].outputs[0].finish_reason == "cancelled"
            assert [t for p in o for t in p.outputs[0].token_ids_diff] == final.outputs[0].token_ids
    assert len(outs[0]) > 1, "the running requests had streamed before shutdown"
    assert not thread.is_alive()
    assert _engine_threads() <= before
    with pytest.raises(RuntimeError):
        llm.generate_async("x")
    llm.shutdown()  # a second shutdown is harmless
