"""Overlapped prefill calls (Engine.overlap_prefill): a prefill-only step's call is collected in the
next step, after that step's own call is dispatched, so the host's work runs while the device
computes. The promises: it does overlap, and nothing a caller sees changes -- tokens, text,
logprobs, finish reasons, streaming -- through chunked prompts, prefix reuse, preemption, stop
strings, aborts and shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import llm_with_small_pool
from jaxllm import LLM, SamplingParams
from jaxllm.engine.block_manager import BlockManager
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    """Small token budget (many prefill calls, long prompts chunked) and a small pool (preemption)."""
    with llm_with_small_pool(tiny_checkpoints["llama3"], 640, max_seq_len=256, max_batch_size=16, max_num_tokens=64,
                             decode_steps=4) as llm:
        yield llm


def _trace(engine, monkeypatch, kind: str = "prefill") -> list[tuple[str, int]]:
    """Records ("dispatch" | "collect", call number) of every prefill (or decode) call, in order (a
    call is known by its result, which lives until it is collected)."""
    events, numbers = [], {}
    dispatch, collect = getattr(engine, f"_dispatch_{kind}"), getattr(engine, f"_collect_{kind}")

    def traced_dispatch(*args, **kwargs):
        out = dispatch(*args, **kwargs)
        numbers[id(out)] = k = sum(kind == "dispatch" for kind, _ in events)
        events.append(("dispatch", k))
        return out

    def traced_collect(plan, result):
        events.append(("collect", numbers.pop(id(result))))
        return collect(plan, result)

    monkeypatch.setattr(engine, f"_dispatch_{kind}", traced_dispatch)
    monkeypatch.setattr(engine, f"_collect_{kind}", traced_collect)
    return events


def _workload(vocab: int, n: int = 48, seed: int = 0):
    """Prompts sharing prefixes (some longer than the token budget), and every kind of sampling."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, vocab, size=40).tolist()
    prompts = []
    for i in range(n):
        tail = rng.integers(3, vocab, size=int(rng.integers(1, 120))).tolist()
        prompts.append({"prompt_token_ids": (shared if i % 3 == 0 else []) + tail})
    kinds = [dict(temperature=0), dict(temperature=0.8, seed=11, top_k=20), dict(temperature=0, repetition_penalty=1.3),
             dict(temperature=0.7, seed=5, bad_token_ids=[5, 7]), dict(temperature=0, stop=["a"], min_tokens=2),
             dict(temperature=0, logprobs=2), dict(temperature=0, prompt_logprobs=1), dict(temperature=0, max_tokens=1)]
    params = []
    for i in range(n):
        kw = dict(max_tokens=int(rng.integers(1, 40)), ignore_eos=True) | kinds[i % len(kinds)]
        params.append(SamplingParams(**kw))
    return prompts, params


def _view(out):
    """What a caller sees of a request, exactly; its log probabilities apart (see _same)."""
    c = out.outputs[0]
    entries = [e for e in (c.logprobs or []) + (out.prompt_logprobs or []) if e is not None]
    exact = [[(t, lp.rank, lp.decoded_token) for t, lp in e.items()] for e in entries]
    floats = [c.cumulative_logprob] + [lp.logprob for e in entries for lp in e.values()]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs is None, out.prompt_logprobs is None,
            exact), floats


def _same(a: list, b: list) -> None:
    """Equal outputs. Which requests share a call (and its row bucket) differs between the runs, and
    with it float32 rounding: log probabilities agree to ~1 ulp, not bit for bit. (In bfloat16 such
    rounding can flip a greedy near-tie, with or without overlap: a request alone and in a batch can
    differ there too.)"""
    assert [x for x, _ in a] == [y for y, _ in b]
    for (_, fa), (_, fb) in zip(a, b):
        assert fa == pytest.approx(fb, rel=1e-5, abs=1e-5)


def _run(llm, overlap: bool, prompts, params, switch: str = "overlap_prefill"):
    engine = llm._engine
    before = getattr(engine, switch)
    setattr(engine, switch, overlap)
    try:
        return [_view(o) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        setattr(engine, switch, before)


def test_next_prefill_call_is_dispatched_before_the_last_one_is_collected(llm, monkeypatch):
    engine = llm._engine
    events = _trace(engine, monkeypatch)
    prompts, params = _workload(llm.model_config.vocab_size, seed=1)
    off = _run(llm, False, prompts, params)
    assert events and all(events[i] == ("dispatch", k) and events[i + 1] == ("collect", k)
                          for k, i in enumerate(range(0, len(events), 2))), "without overlap: each call in its own step"
    events.clear()
    on = _run(llm, True, prompts, params)
    ahead = [k for i, (kind, k) in enumerate(events)
             if kind == "collect" and ("dispatch", k + 1) in events[:i]]
    assert len(ahead) >= 3, f"prefill calls were meant to overlap: {events}"
    assert sorted(k for kind, k in events if kind == "collect") == sorted(k for kind, k in events if kind == "dispatch")
    _same(on, off)


def test_overlap_changes_no_output_through_chunking_prefix_reuse_and_preemption(llm):
    engine = llm._engine
    prompts, params = _workload(llm.model_config.vocab_size, n=80, seed=2)
    hits0, pre0 = engine.scheduler.prefix_hit_tokens, engine.scheduler.num_preemptions
    on = _run(llm, True, prompts, params)
    assert engine.scheduler.prefix_hit_tokens > hits0, "the shared prefixes were meant to be reused"
    assert engine.scheduler.num_preemptions > pre0, "the pool was meant to be too small: no preemption happened"
    off = _run(llm, False, prompts, params)
    _same(on, off)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and engine._pending is None


def _assert_streams_match(llm, prompts, params, expected) -> None:
    """Streams every request at once: each one's pieces add up to its expected tokens and text, and
    only its last piece is finished."""
    async def stream_all():
        handles = [llm.generate_async(p, sp, streaming=True) for p, sp in zip(prompts, params)]

        async def one(h):
            return [o async for o in h]

        return await asyncio.gather(*(one(h) for h in handles))

    for outs, (exp, _) in zip(asyncio.run(stream_all()), expected):
        assert [t for o in outs for t in o.outputs[0].token_ids_diff] == exp[0]
        assert "".join(o.outputs[0].text_diff for o in outs) == exp[1]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_streaming_with_overlap_yields_every_token_in_order(llm):
    prompts, params = _workload(llm.model_config.vocab_size, n=24, seed=3)
    _assert_streams_match(llm, prompts, params, _run(llm, False, prompts, params))


def _assert_cancelled_or_exact(handles, outs, expected, aborted) -> None:
    """The aborted requests ended "cancelled"; every other one gave what it gives without the abort."""
    for h, out, exp in zip(handles, outs, expected):
        if h.request_id in aborted:
            assert out.outputs[0].finish_reason == "cancelled"
        else:
            _same([_view(out)], [exp])


def _abort_in_a_chained_run(llm, monkeypatch, prompts, params, victim_of, why: str) -> None:
    """Runs prompts with decode calls chained (overlap_decode), aborting victim_of's request once
    (_abort_while_pending): it ends "cancelled", the others give what they give unchained, and
    nothing leaks. `why`: the failure message if nothing was aborted."""
    engine = llm._engine
    expected = _run_decode(llm, False, prompts, params)
    aborted = _abort_while_pending(engine, monkeypatch, victim_of)
    engine.overlap_decode = True
    try:
        handles = [llm.generate_async(p, sp) for p, sp in zip(prompts, params)]
        outs = [h.result(timeout=120) for h in handles]
    finally:
        engine.overlap_decode = None  # the default
    assert aborted, why
    _assert_cancelled_or_exact(handles, outs, expected, aborted)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and not engine._in_flight


def _abort_while_pending(engine, monkeypatch, victim_of) -> list[int]:
    """Wraps the engine's step: after the first step that leaves a call uncollected, aborts the
    request victim_of(engine) names (None: no call pending), handled before the next step collects
    the call. Returns the aborted ids (one)."""
    aborted = []
    step = engine._step

    def step_then_abort():
        step()
        victim = None if aborted else victim_of(engine)
        if victim is not None:
            aborted.append(victim.request_id)
            engine.abort(victim.request_id)

    monkeypatch.setattr(engine, "_step", step_then_abort)
    return aborted


def test_abort_while_its_prefill_call_is_pending(llm, monkeypatch):
    """A request aborted while its prefill call is still uncollected ends "cancelled"; every other
    request gives what it gives without the abort, and nothing leaks."""
    engine = llm._engine
    prompts, params = _workload(llm.model_config.vocab_size, n=32, seed=4)
    expected = _run(llm, False, prompts, params)
    aborted = _abort_while_pending(engine, monkeypatch,
                                   lambda e: e._pending[0].prefill[0][0] if e._pending is not None else None)
    handles = [llm.generate_async(p, sp) for p, sp in zip(prompts, params)]
    outs = [h.result(timeout=120) for h in handles]
    assert aborted, "no prefill call was left pending"
    _assert_cancelled_or_exact(handles, outs, expected, aborted)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and engine._pending is None


@pytest.mark.parametrize("kind", ["prefill", "decode", "decode from the dispatch thread"])
def test_shutdown_with_a_call_pending_cancels_and_loses_nothing(tiny_checkpoints, monkeypatch, kind):
    """Shut down (from the engine thread) while a prefill call (overlap_prefill) or a decode call
    (overlap_decode; or dispatch_thread's, a Future) is uncollected: every request ends, with its
    tokens or cancelled."""
    decode = kind != "prefill"
    monkeypatch.setenv("JAXLLM_OVERLAP_DECODE", "1" if decode else "0")
    monkeypatch.setenv("JAXLLM_DISPATCH_THREAD", "1" if kind.endswith("thread") else "0")
    llm = LLM(str(tiny_checkpoints["llama3"]), max_seq_len=256, max_batch_size=16, max_num_tokens=64, decode_steps=4)
    engine = llm._engine
    step = engine._step

    def step_then_stop():
        step()
        if (engine._pending_decode if decode else engine._pending) is not None:
            engine.shutdown()  # from the engine thread: sets the flag, the loop ends after this step

    monkeypatch.setattr(engine, "_step", step_then_stop)
    rng = np.random.default_rng(6)
    handles = [llm.generate_async({"prompt_token_ids": rng.integers(3, 200, size=20 if decode else 60).tolist()},
                                  SamplingParams(max_tokens=12 if decode else 8, ignore_eos=decode)) for _ in range(8)]
    outs = [h.result(timeout=120) for h in handles]
    assert all(o.finished for o in outs)
    assert {(o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs} <= {("cancelled", "shutdown"),
                                                                                        ("length", None)}
    assert not engine._in_flight
    assert (engine._dispatcher is not None) is kind.endswith("thread")
    llm.shutdown()


# -- the scheduler's side, without a device -------------------------------------------------------
def _req(rid: int, prompt_len: int, max_tokens: int = 8) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, None, [3 + (rid + i) % 50 for i in range(prompt_len)], sp, np.zeros(2, np.uint32), [])


def test_scheduler_skips_requests_awaiting_an_in_flight_token_and_joins_them_later():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=4)
    a, b, c = _req(0, 6), _req(1, 6), _req(2, 6)
    for r in (a, b):
        sched.add(r)
    first = sched.schedule()
    assert [r for r, _, _ in first.prefill] == [a, b]
    a.num_computed = b.num_computed = 6  # what dispatching the call records; their tokens are not back
    sched.add(c)
    second = sched.schedule()
    assert [r for r, _, _ in second.prefill] == [c] and second.decode == [], "a and b await their token"
    for r in (b, a):  # the first call's tokens arrive (b's first, to check the order)
        r.receive(7, {"logprob": 0.0}, False)
    sched.join_decode(second, [b, a])
    assert second.decode == [a, b], "they decode this step, in admission order"
    assert len(a.blocks) * bm.block_size >= 6 + 4, "their decode steps' KV slots are allocated"

    # a request whose sequence ended (released) or that was preempted meanwhile does not join
    d = _req(3, 6)
    sched.add(d)
    third = sched.schedule()
    d.num_computed = 6
    d.receive(7, {"logprob": 0.0}, True)
    sched.release(d)
    assert d.status is Status.FINISHED
    sched.join_decode(third, [d])
    assert d not in third.decode


def test_continue_decode_grows_blocks_for_two_calls_or_refuses():
    """Rows whose decode call is in flight run on only while they are all there is to do: then the
    blocks of those the call leaves unfinished cover that call and the next; a waiting request, a
    finished row, or every row ending within the call in flight refuse."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=4)
    a, b = _req(0, 6, max_tokens=20), _req(1, 6, max_tokens=3)
    for r in (a, b):
        sched.add(r)
    sched.schedule()
    for r in (a, b):
        r.num_computed = 6
        r.receive(7, {"logprob": 0.0}, False)
    assert sched.schedule().decode == [a, b]
    b_blocks = list(b.blocks)
    assert sched.continue_decode([a, b])
    assert len(a.blocks) * bm.block_size >= 6 + 2 * 4, "a's KV slots for the call in flight and the next"
    assert b.blocks == b_blocks, "b ends within the call in flight: nothing to grow"
    assert not sched.continue_decode([a]), "b is running too: not every running request"
    sched.add(_req(2, 6))
    assert not sched.continue_decode([a, b]), "a request waits"
    sched.waiting.clear()
    sched.release(b)
    assert not sched.continue_decode([a, b]), "b finished"
    short = _req(3, 6, max_tokens=4)
    sched2 = Scheduler(BlockManager(64, 4), max_batch_size=8, max_num_tokens=100, decode_steps=4)
    sched2.add(short)
    sched2.schedule()
    short.num_computed = 6
    short.receive(7, {"logprob": 0.0}, False)
    assert not sched2.continue_decode([short]), "the call in flight ends every row"


def test_decode_after_prefill_grows_blocks_for_the_call_or_refuses():
    """Requests whose prompts a prefill call in flight completes may have their first decode call at
    once only while they are all there is to do: then the blocks of those going on past the prefill's
    token cover the call; a waiting request, a running request besides them, a prompt not yet
    computed, or every row ending with the prefill's token refuse."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=4)
    a, b = _req(0, 6, max_tokens=20), _req(1, 6, max_tokens=1)
    for r in (a, b):
        sched.add(r)
    plan = sched.schedule()
    assert [r for r, _, _ in plan.prefill] == [a, b]
    assert not sched.decode_after_prefill([a, b]), "their prompts' KV not counted yet (the prefill not dispatched)"
    for r in (a, b):
        r.num_computed = 6  # as Engine._dispatch_prefill counts it
    b_blocks = list(b.blocks)
    assert not sched.decode_after_prefill([a]), "b is running too: not every running request"
    assert sched.decode_after_prefill([a, b])
    assert len(a.blocks) * bm.block_size >= 6 + 4, "a's KV slots for the prompt and the call"
    assert b.blocks == b_blocks, "b ends with the prefill's token: nothing to grow"
    sched.add(_req(2, 6))
    assert not sched.decode_after_prefill([a, b]), "a request waits"
    sched.waiting.clear()
    only_b = Scheduler(BlockManager(64, 4), max_batch_size=8, max_num_tokens=100, decode_steps=4)
    c = _req(3, 6, max_tokens=1)
    only_b.add(c)
    only_b.schedule()
    c.num_computed = 6
    assert not only_b.decode_after_prefill([c]), "every row ends with the prefill's token"


def test_first_decode_call_is_chained_onto_its_prefill(llm, monkeypatch):
    """overlap_decode from a prefill (Engine._decode_after_prefill): where a prefill-only call completes
    every running request's prompt, their first decode call goes out before that prefill is collected,
    from the state the prefill returns -- the state the host builds once the first tokens are in
    (check_reused_state) -- and the outputs are those of unchained calls (greedy, seeded sampling,
    penalties, logprobs, a row ending with its first token). Prompts that take several prefill steps
    (requests waiting meanwhile) do not chain there."""
    engine = llm._engine
    rng = np.random.default_rng(21)
    log = []
    for name in ("_dispatch_prefill", "_collect_prefill", "_dispatch_decode", "_collect_decode"):
        f = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, f=f, name=name, **k: log.append(name) or f(*a, **k))
    kinds = [dict(temperature=0), dict(temperature=0.8, seed=3, top_p=0.9), dict(temperature=0, logprobs=2),
             dict(temperature=0, repetition_penalty=1.2)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True, **kw) for m, kw in zip((20, 13, 1, 9), kinds)]
    prompts = [{"prompt_token_ids": rng.integers(3, 200, size=12).tolist()} for _ in params]  # one prefill call
    off = _run_decode(llm, False, prompts, params)
    assert log.index("_collect_prefill") < log.index("_dispatch_decode")
    log.clear()
    engine.check_reused_state = True
    try:
        on = _run_decode(llm, True, prompts, params)
    finally:
        engine.check_reused_state = False
    assert log[:3] == ["_dispatch_prefill", "_dispatch_decode", "_collect_prefill"], log
    assert log.count("_dispatch_decode") == log.count("_collect_decode")
    _same(on, off)
    log.clear()
    engine.decode_after_prefill = False  # JAXLLM_DECODE_AFTER_PREFILL=0: the decode calls still chain, not onto it
    try:
        _same(_run_decode(llm, True, prompts, params), off)
    finally:
        engine.decode_after_prefill = True
    assert log.index("_collect_prefill") < log.index("_dispatch_decode")
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and not engine._in_flight
    # six prompts over the 64-token budget: several prefill steps, requests waiting or already running
    prompts = [{"prompt_token_ids": rng.integers(3, 200, size=30).tolist()} for _ in range(6)]
    params = [SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)] * 6
    off = _run_decode(llm, False, prompts, params)
    log.clear()
    on = _run_decode(llm, True, prompts, params)
    first = log.index("_dispatch_decode")
    assert log[first - 1] != "_dispatch_prefill", "a decode call chained onto a prefill with requests waiting"
    _same(on, off)


def test_abort_while_a_decode_call_chained_onto_its_prefill_is_pending(llm, monkeypatch):
    """A request aborted while both its prefill call and the first decode call chained onto it are
    uncollected ends "cancelled"; the others give what they give unchained; nothing leaks."""
    rng = np.random.default_rng(23)
    prompts = [{"prompt_token_ids": rng.integers(3, 200, size=10).tolist()} for _ in range(3)]
    params = [SamplingParams(max_tokens=18, ignore_eos=True, temperature=0) for _ in prompts]

    def victim(e):  # the prefill's last request, once the prefill and its chained decode call are both out
        return e._pending[0].prefill[-1][0] if e._pending is not None and e._pending_decode is not None else None

    _abort_in_a_chained_run(llm, monkeypatch, prompts, params, victim, "no decode call was chained onto a pending prefill")


def test_join_decode_respects_prefill_first():
    """A plan that held its decode rows back (requests still wait for slots) takes no joiners."""
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=6, decode_steps=4)
    reqs = [_req(i, 6) for i in range(4)]
    for r in reqs:
        sched.add(r)
    plan = sched.schedule()
    assert [r for r, _, _ in plan.prefill] == reqs[:1]
    reqs[0].num_computed = 6
    reqs[0].receive(7, {"logprob": 0.0}, False)
    plan = sched.schedule()  # reqs[0] decodes, reqs[1] prefills, two still wait: decode held back
    assert plan.decode_deferred and plan.decode == []
    reqs[1].num_computed = 6
    reqs[1].receive(7, {"logprob": 0.0}, False)
    sched.join_decode(plan, [reqs[1]])
    assert plan.decode == []


@pytest.mark.parametrize("name,attr,default", [("JAXLLM_OVERLAP", "overlap_prefill", True),
                                               ("JAXLLM_OVERLAP_DECODE", "overlap_decode", None),
                                               ("JAXLLM_DECODE_AFTER_PREFILL", "decode_after_prefill", True),
                                               ("JAXLLM_ALIGN_DECODE", "align_decode_calls", True)])
def test_overlap_switches(tiny_checkpoints, monkeypatch, name, attr, default):
    """JAXLLM_OVERLAP (prefill calls): on by default; JAXLLM_OVERLAP_DECODE (decode calls): auto
    (None: where the call's loop is fixed); JAXLLM_DECODE_AFTER_PREFILL (a first decode call chained
    onto its prefill, where decode calls chain): on; JAXLLM_ALIGN_DECODE (a fixed-loop call one step
    shorter to align the rest with max_tokens): on. 0 turns one off, 1 on, anything else is refused
    naming the switch."""
    path = str(tiny_checkpoints["llama3"])
    for value, on in ((None, default), ("0", False), ("1", True)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        with LLM(path, max_seq_len=64, compilation_cache=False) as llm:
            assert getattr(llm._engine, attr) is on
    monkeypatch.setenv(name, "off")
    with pytest.raises(ValueError, match=f"{name}='off': expected (auto, )?0 or 1"):
        LLM(path, max_seq_len=64, compilation_cache=False)


# -- chained decode calls (Engine.overlap_decode: where the loop is fixed, JAXLLM_OVERLAP_DECODE) ---------
def _run_decode(llm, on: bool, prompts, params):
    return _run(llm, on, prompts, params, "overlap_decode")


def test_next_decode_call_is_dispatched_before_the_last_one_is_collected(llm, monkeypatch):
    """Rows that only decode chain their calls: call k + 1 goes out before call k is collected, from
    the state call k returns; the tokens are those of unchained calls (greedy, seeded sampling,
    penalties, logprobs, rows ending at different lengths)."""
    engine = llm._engine
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(3, 200, size=int(rng.integers(4, 30))).tolist()} for _ in range(6)]
    kinds = [dict(temperature=0), dict(temperature=0.8, seed=3, top_p=0.9), dict(temperature=0, logprobs=2),
             dict(temperature=0, repetition_penalty=1.2), dict(temperature=0.6, seed=9), dict(temperature=0)]
    params = [SamplingParams(max_tokens=m, ignore_eos=True, **kw) for m, kw in zip((30, 30, 29, 30, 17, 30), kinds)]
    events = _trace(engine, monkeypatch, "decode")
    off = _run_decode(llm, False, prompts, params)
    assert events and all(events[i] == ("dispatch", k) and events[i + 1] == ("collect", k)
                          for k, i in enumerate(range(0, len(events), 2))), "off: each call collected in its step"
    events.clear()
    on = _run_decode(llm, True, prompts, params)
    ahead = [k for i, (kind, k) in enumerate(events) if kind == "collect" and ("dispatch", k + 1) in events[:i]]
    assert len(ahead) >= 3, f"decode calls were meant to chain: {events}"
    assert sorted(k for kind, k in events if kind == "collect") == sorted(k for kind, k in events if kind == "dispatch")
    _same(on, off)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and not engine._in_flight


def test_chained_decode_changes_no_output_through_stops_preemption_and_arrivals(llm):
    """The mixed workload (stop strings ending rows mid-call, chunked prompts, prefix reuse, a pool
    small enough to preempt) gives the same outputs chained and not."""
    engine = llm._engine
    prompts, params = _workload(llm.model_config.vocab_size, n=64, seed=8)
    pre0 = engine.scheduler.num_preemptions
    on = _run_decode(llm, True, prompts, params)
    assert engine.scheduler.num_preemptions > pre0, "the pool was meant to be too small: no preemption happened"
    off = _run_decode(llm, False, prompts, params)
    _same(on, off)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and not engine._in_flight


def test_chained_decode_streams_every_token_in_order(llm):
    prompts, params = _workload(llm.model_config.vocab_size, n=12, seed=9)
    expected = _run_decode(llm, False, prompts, params)
    llm._engine.overlap_decode = True
    try:
        _assert_streams_match(llm, prompts, params, expected)
    finally:
        llm._engine.overlap_decode = None  # the default


@pytest.mark.parametrize("thread", [False, True])
def test_abort_while_a_decode_call_is_pending(llm, monkeypatch, thread):
    """A request aborted while its decode call is uncollected (dispatched from the dispatch thread
    too) ends "cancelled"; the others give what they give without the abort; no block leaks."""
    rng = np.random.default_rng(10)
    prompts = [{"prompt_token_ids": rng.integers(3, 200, size=12).tolist()} for _ in range(5)]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, temperature=0) for _ in prompts]
    monkeypatch.setattr(llm._engine, "dispatch_thread", thread)
    _abort_in_a_chained_run(llm, monkeypatch, prompts, params,
                            lambda e: e._pending_decode[0][1] if e._pending_decode is not None else None,
                            "no decode call was left pending")


def test_decode_calls_chain_by_default_exactly_where_their_loop_is_fixed(llm, monkeypatch):
    """JAXLLM_OVERLAP_DECODE=auto (overlap_decode None): a decode call chains when its program runs a
    fixed loop (ModelRunner.decode_check_every None: on GPUs, calls of up to 256 rows), whose dispatch
    does not wait for the device; with a while loop (CPU, or more rows) each call is collected in
    its own step. Here a stand-in policy makes calls of up to 4 rows fixed; the outputs are those of
    unchained calls either way."""
    engine = llm._engine
    monkeypatch.setattr(engine.runner, "decode_check_every", lambda rows, tail=False: None if rows <= 4 else 1)
    reqs = [llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4)) for _ in range(5)]
    assert engine._chains_decode(reqs[:4]) and not engine._chains_decode(reqs)
    events = _trace(engine, monkeypatch, "decode")
    rng = np.random.default_rng(12)
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0)
    for n, chains in ((3, True), (8, False)):
        prompts = [{"prompt_token_ids": rng.integers(3, 200, size=10).tolist()} for _ in range(n)]
        off = _run_decode(llm, False, prompts, params)
        events.clear()
        on = _run_decode(llm, None, prompts, params)
        ahead = [k for i, (kind, k) in enumerate(events) if kind == "collect" and ("dispatch", k + 1) in events[:i]]
        assert bool(ahead) is chains, (n, events)
        _same(on, off)


def _gpu_decode_calls(engine, monkeypatch) -> list[tuple[int, int | None]]:
    """Decode loops as on a GPU (fixed where the runner's policy says so; stood in for here), and a list
    that records each decode call's (steps, check_every) as it is made."""
    monkeypatch.setattr(engine.runner, "_on_gpu", True)
    made, decode_call = [], engine.runner.decode_call

    def traced(*args, **kwargs):
        call = decode_call(*args, **kwargs)
        made.append((call[1]["steps"], call[1]["check_every"]))
        return call

    monkeypatch.setattr(engine.runner, "decode_call", traced)
    return made


def test_a_tail_call_ends_with_its_rows_and_is_not_chained(llm, monkeypatch):
    """Where decode calls run a fixed loop by default (GPUs; stood in for here), a call whose every
    row ends within it by max_tokens (a tail call) runs the loop that ends with them instead -- a
    fixed one would run its remaining steps for nothing, and the rows' last tokens would wait for
    them -- and is not chained (its dispatch would wait for it). max_tokens 11 at 4 steps a call:
    the first token from the prefill, then fixed (chained onto the prefill), fixed (chained), and
    the last 2 in a while loop; the tokens are those of while loops only."""
    engine = llm._engine
    calls = _gpu_decode_calls(engine, monkeypatch)
    events = _trace(engine, monkeypatch, "decode")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}]
    params = SamplingParams(max_tokens=11, ignore_eos=True, temperature=0)
    llm.reset_phase_times()
    on = llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    loops = [every for _, every in calls]
    assert loops == [None, None, 1], loops
    assert engine.decode_loops == {"fixed": 2, "chained": 2, "while": 1}  # what the bench report records
    assert events == [("dispatch", 0), ("dispatch", 1), ("collect", 0), ("collect", 1), ("dispatch", 2),
                      ("collect", 2)], events
    monkeypatch.setattr(engine.runner, "_on_gpu", False)
    assert len(on) == 11 and on == llm.generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids


def test_precompile_covers_both_loops_where_a_tail_call_runs_another(llm, monkeypatch):
    """precompile's decode programs: on GPUs (stood in for) each row bucket's fixed loop and its tail
    calls' while loop, both; on CPUs one while loop a bucket."""
    engine = llm._engine

    def loops():
        calls = [c for c in engine._warmup_calls(32, [True]) if c[0] == "decode"]
        return sorted({(c[2][1].tokens.shape[0], c[1]["check_every"] is None) for c in calls})

    cpu = loops()
    assert cpu and all(not fixed for _, fixed in cpu)
    monkeypatch.setattr(engine.runner, "_on_gpu", True)
    assert loops() == sorted(cpu + [(rows, True) for rows, _ in cpu])


def test_first_decode_call_aligns_the_rest_to_max_tokens(llm, monkeypatch):
    """Where decode calls run a fixed loop (GPUs; stood in for here), a call whose every row has made one
    token past a multiple of decode_steps (a request's first: its first token came from the prefill)
    runs decode_steps - 1 steps (Engine._call_steps), so a max_tokens that is a multiple of decode_steps
    ends exactly with a fixed call: 16 tokens at 4 steps a call are the prefill's, then 3, 4, 4, 4 -- not
    4, 4, 4 and a tail of 3. The tokens are the same either way (JAXLLM_ALIGN_DECODE=0: off), and
    precompile covers the shorter call's program."""
    engine = llm._engine
    steps = _gpu_decode_calls(engine, monkeypatch)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [9, 3, 4]}]
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0)
    aligned = llm.generate(prompts, params, use_tqdm=False)
    assert steps == [(3, None), (4, None), (4, None), (4, None)], steps
    steps.clear()
    engine.align_decode_calls = False
    try:
        plain = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.align_decode_calls = True
    assert steps == [(4, None), (4, None), (4, None), (4, 1)], steps
    assert [o.outputs[0].token_ids for o in aligned] == [o.outputs[0].token_ids for o in plain]
    assert all(len(o.outputs[0].token_ids) == 16 for o in aligned)
    steps.clear()
    warm = {(c[1]["steps"], c[1]["check_every"]) for c in engine._warmup_calls(32, [True]) if c[0] == "decode"}
    assert warm == {(4, None), (4, 1), (3, None)}, warm
    from jaxllm.engine.engine import ALIGN_MAX_ROWS

    rows = {c[2][1].tokens.shape[0] for c in engine._warmup_calls(32, [True]) if c[0] == "decode" and c[1]["steps"] == 3}
    assert rows and max(rows) <= ALIGN_MAX_ROWS, rows


def test_a_call_is_a_tail_once_it_would_waste_an_eighth_of_its_steps():
    """Engine._tail: at 16 steps a call, a fixed loop wasting 2 or more steps past every row's
    max_tokens gives way to the while loop; 1 wasted step does not (the while loop's host round trip
    each step costs more). Steps still in flight (`ahead`) count as made; the row furthest from its
    end decides."""
    from types import SimpleNamespace

    from jaxllm.engine.engine import Engine

    engine = SimpleNamespace(scheduler=SimpleNamespace(decode_steps=16))

    def tail(left, ahead=0, *others):
        reqs = [SimpleNamespace(params=SimpleNamespace(max_tokens=100), num_generated=100 - n) for n in (left, *others)]
        return Engine._tail(engine, reqs, ahead)

    assert [tail(n) for n in (1, 8, 14, 15, 16, 40)] == [True, True, True, False, False, False]
    assert tail(30, 16) and not tail(31, 16)
    assert not tail(3, 0, 15) and tail(3, 0, 14)


def test_a_dispatch_thread_chains_while_loop_calls_and_changes_no_output(llm, monkeypatch):
    """dispatch_thread (JAXLLM_DISPATCH_THREAD=1): decode calls to be collected later are dispatched
    from a thread of their own, so every decode call chains, while loops included (here, on a CPU,
    all of them): call k + 1 goes out from the state call k returns (the state the host would build:
    check_reused_state) while the engine thread collects call k. The mixed workload (stop strings,
    chunked prompts, prefix reuse, preemption, every kind of sampling) gives the same outputs as
    unchained calls; nothing leaks; the phase decode_wait counts the engine's waits for a dispatch."""
    import threading

    engine = llm._engine
    threads, decode = [], engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode",
                        lambda *a, **k: threads.append(threading.current_thread().name) or decode(*a, **k))
    prompts, params = _workload(llm.model_config.vocab_size, n=40, seed=31)
    off = _run_decode(llm, None, prompts, params)  # the default on a CPU: while loops, none chained
    assert not any(t.startswith("jaxllm-dispatch") for t in threads)
    req = llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=40))
    assert not engine._chains_decode([req])  # a while loop's call: not chained without the thread
    threads.clear()
    pre0 = engine.scheduler.num_preemptions
    llm.reset_phase_times()
    engine.dispatch_thread = engine.check_reused_state = True
    try:
        on = _run_decode(llm, None, prompts, params)
        assert engine._chains_decode([req])  # ... and chained with it
    finally:
        engine.dispatch_thread = engine.check_reused_state = False
    assert engine.scheduler.num_preemptions > pre0, "the pool was meant to be too small: no preemption happened"
    assert engine.decode_loops["while"] >= 3 and engine.decode_loops["chained"] >= 3, engine.decode_loops
    assert any(t.startswith("jaxllm-dispatch") for t in threads) and any(t == "jaxllm-engine" for t in threads)
    assert llm.get_phase_times()["decode_wait"]["calls"] >= engine.decode_loops["chained"]
    _same(on, off)
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work and not engine._in_flight
