"""Host-side KV bookkeeping, without a model: the block manager (ref counts, prefix cache, LRU
eviction) and the scheduler (FCFS admission, chunked prefill, preemption of the newest request)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.engine.block_manager import BlockManager, chain_hashes
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler


# -- BlockManager: allocation and reference counts -----------------------------------------------
def test_allocate_release_and_ref_counts():
    bm = BlockManager(8, 4)
    assert (bm.num_free, bm.num_used) == (8, 0)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(1) == 1 and bm.blocks_needed(4) == 1
    assert bm.blocks_needed(5) == 2

    a = bm.allocate(3)
    assert len(a) == 3 and len(set(a)) == 3
    assert (bm.num_free, bm.num_used) == (5, 3)
    assert all(bm.ref[b] == 1 for b in a)

    assert bm.allocate(6) is None, "more blocks than are free must not be handed out"
    assert (bm.num_free, bm.num_used) == (5, 3), "a refused allocation must change nothing"

    b = bm.allocate(5)
    assert set(a).isdisjoint(b) and bm.num_free == 0
    assert bm.allocate(1) is None
    assert bm.allocate(0) == []

    # a second owner (as a prefix-cache hit would add) keeps the block in use after one release
    bm.take([a[0]])
    assert bm.ref[a[0]] == 2
    bm.release([a[0]])
    assert bm.ref[a[0]] == 1 and bm.num_used == 8
    bm.release(a)
    bm.release(b)
    assert (bm.num_free, bm.num_used) == (8, 0)
    assert all(r == 0 for r in bm.ref)
    with pytest.raises(AssertionError):
        bm.release([a[0]])


def test_pool_must_hold_a_block():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


# -- chain hashes and prefix matching ------------------------------------------------------------
def test_chain_hashes_name_the_whole_prefix():
    x = list(range(10, 22))  # 3 blocks of 4
    y = [99] + x[1:]  # differs only in the first block
    hx, hy = chain_hashes(x, 4), chain_hashes(y, 4)
    assert len(hx) == 3 and len(chain_hashes(x[:11], 4)) == 2  # only full blocks
    assert hx[0] != hy[0]
    # blocks 1 and 2 hold the same tokens in x and y, yet their hashes differ: the prefix differs
    assert hx[1] != hy[1] and hx[2] != hy[2]
    assert chain_hashes(x[:8], 4) == hx[:2], "a prefix hashes the same alone and inside a longer list"
    assert chain_hashes(x[4:], 4, parent=hx[0]) == hx[1:], "chaining on a parent continues the chain"
    assert chain_hashes(list(x), 4) == hx


def _fill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate blocks for tokens and register the full ones, as the engine does after computing."""
    blocks = bm.allocate(bm.blocks_needed(len(tokens)))
    assert blocks is not None
    for b, h in zip(blocks, chain_hashes(tokens, bm.block_size)):
        bm.register(b, h)
    return blocks


def test_match_prefix_never_covers_the_whole_prompt():
    bm = BlockManager(8, 4)
    tokens = list(range(100, 108))  # exactly 2 full blocks
    blocks = _fill(bm, tokens)
    bm.release(blocks)
    # all 8 tokens are cached, but the last one must be recomputed (its logits give the next token)
    assert bm.match_prefix(tokens) == blocks[:1]
    assert bm.match_prefix(tokens + [5]) == blocks
    assert bm.match_prefix(tokens[:5]) == blocks[:1]
    assert bm.match_prefix(tokens[:4]) == [], "a one-block prompt reuses nothing (its last token is in it)"
    assert bm.match_prefix([1]) == []


def test_match_prefix_stops_at_the_first_differing_block():
    bm = BlockManager(8, 4)
    x = list(range(10, 22)) + [1]
    bm.release(_fill(bm, x))
    y = [99] + x[1:]  # same blocks 1 and 2, different block 0
    assert bm.match_prefix(y) == []
    z = x[:4] + [98] + x[5:]  # block 0 shared, block 1 differs
    assert bm.match_prefix(z) == bm.match_prefix(x)[:1]


def test_reuse_disabled_caches_nothing():
    bm = BlockManager(8, 4, enable_reuse=False)
    x = list(range(10, 22)) + [1]
    blocks = _fill(bm, x)
    assert bm.cached == {} and all(h is None for h in bm.block_hash)
    bm.release(blocks)
    assert bm.match_prefix(x) == []


def test_freed_cached_blocks_are_reused_until_evicted_least_recently_freed_first():
    bm = BlockManager(6, 4)
    a = list(range(100, 109))  # 9 tokens: 2 full blocks + 1 partial
    b = list(range(200, 209))
    a_blocks = _fill(bm, a)
    b_blocks = _fill(bm, b)
    assert bm.num_free == 0
    bm.release(a_blocks)  # A is freed first, then B
    bm.release(b_blocks)
    assert bm.num_used == 0, "freed blocks count as free even while they stay in the prefix cache"
    assert bm.match_prefix(a) == a_blocks[:2]
    assert bm.match_prefix(b) == b_blocks[:2]

    # allocations evict least recently freed first: A before B, and within A its tail first
    got = bm.allocate(1)
    assert got == [a_blocks[2]], "A's uncached partial block goes first"
    assert bm.match_prefix(a) == a_blocks[:2]
    got = bm.allocate(1)
    assert got == [a_blocks[1]]
    assert bm.match_prefix(a) == a_blocks[:1], "evicting A's second block cuts A's cached prefix there"
    assert bm.match_prefix(b) == b_blocks[:2], "B was freed later: still cached"
    got = bm.allocate(1)
    assert got == [a_blocks[0]]
    assert bm.match_prefix(a) == []
    assert bm.block_hash[a_blocks[0]] is None, "an evicted block forgets its hash"

    # a cached block taken again leaves the free list: allocations cannot evict it
    hit = bm.match_prefix(b)
    bm.take(hit)
    assert bm.num_used == 3 + 2 and all(bm.ref[x] == 1 for x in hit)
    rest = bm.allocate(bm.num_free)
    assert rest == [b_blocks[2]] and set(hit).isdisjoint(rest)
    assert bm.allocate(1) is None
    assert bm.match_prefix(b) == hit


def test_retaken_block_moves_to_most_recently_freed():
    bm = BlockManager(4, 4)
    x, y = list(range(10, 15)), list(range(20, 25))
    bx, by = _fill(bm, x), _fill(bm, y)  # 2 blocks each
    bm.release(bx)
    bm.release(by)  # LRU order: bx[1], bx[0], by[1], by[0]
    hit = bm.match_prefix(x)
    assert hit == bx[:1]
    bm.take(hit)
    bm.release(hit)  # bx[0] is now the most recently freed
    assert bm.allocate(3) == [bx[1], by[1], by[0]]
    assert bm.match_prefix(x) == bx[:1], "the re-freed block outlived the older ones"
    assert bm.match_prefix(y) == []


def test_evicting_a_duplicate_keeps_the_cached_original():
    bm = BlockManager(4, 4)
    x = list(range(10, 15))
    first = _fill(bm, x)
    second = _fill(bm, x)  # same contents computed again: its hash is already cached by `first`
    bm.release(second)  # `second` is freed first, so evicted first
    bm.release(first)
    assert bm.match_prefix(x) == first[:1]
    bm.allocate(2)  # evicts both blocks of `second`
    assert bm.match_prefix(x) == first[:1], "evicting a duplicate must not drop the original's cache entry"


# -- Scheduler, with fake requests and a fake engine step ---------------------------------------
def _req(rid: int, prompt_len: int, max_tokens: int) -> Request:
    ids = [(rid * 7919 + i * 31) % 1000 + 3 for i in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, None, ids, sp, np.zeros(2, np.uint32), [])


def _token(req: Request, i: int) -> int:
    """The fake model's i-th output token of req: fixed, so recomputation changes nothing."""
    return (req.request_id * 131 + i * 17) % 1000 + 3


def _emit(req: Request) -> None:
    n = req.num_generated + 1
    req.receive(_token(req, n - 1), {"logprob": 0.0}, n >= req.params.max_tokens)
    req.apply_pending()


def _apply(sched: Scheduler, plan) -> list[Request]:
    """What the engine does with a plan (without a device): returns the requests that finished."""
    bm = sched.blocks
    for r, start, end in plan.prefill:
        assert start == r.num_computed and end <= len(r.all_ids)
        assert len(r.blocks) * bm.block_size >= end, "a prefill chunk's KV slots must be allocated"
        r.num_computed = end
        if end == len(r.all_ids):
            _emit(r)
    for r in plan.decode:
        assert len(r.all_ids) - r.num_computed == 1
        for _ in range(sched.decode_steps):
            # the KV of the current last token is written, then a new token is sampled
            assert len(r.blocks) * bm.block_size > r.num_computed, "a decode step's KV slot must be allocated"
            r.num_computed += 1
            _emit(r)
            if r.finished:
                break
    done = []
    for r in [r for r, _, _ in plan.prefill] + plan.decode:
        for b, h in zip(r.blocks, r.full_block_hashes(bm.block_size)):
            bm.register(b, h)
        if r.finished and r not in done:
            sched.release(r)
            done.append(r)
    return done


def test_fcfs_admission_fills_free_slots_in_arrival_order():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=2, max_num_tokens=100, decode_steps=4)
    reqs = [_req(i, 5, 3) for i in range(4)]
    for r in reqs:
        sched.add(r)
    plan = sched.schedule()
    assert [(r, s, e) for r, s, e in plan.prefill] == [(reqs[0], 0, 5), (reqs[1], 0, 5)]
    assert sched.running == reqs[:2] and list(sched.waiting) == reqs[2:]
    assert reqs[0].admitted_seq < reqs[1].admitted_seq
    assert all(r.status is Status.RUNNING for r in reqs[:2]) and reqs[2].status is Status.WAITING
    _apply(sched, plan)
    plan = sched.schedule()  # the batch is full: the two decode, nobody is admitted
    assert plan.decode == reqs[:2] and plan.prefill == []
    finished = _apply(sched, plan)
    assert finished == reqs[:2] and sched.running == []
    plan = sched.schedule()
    assert [r for r, _, _ in plan.prefill] == reqs[2:], "freed slots go to the waiting requests, oldest first"


def test_admission_does_not_skip_a_head_that_does_not_fit():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=4)
    hog = _req(0, 12, 2)  # 3 blocks
    big = _req(1, 9, 2)  # 3 blocks: does not fit beside hog
    small = _req(2, 2, 2)  # 1 block: would fit
    for r in (hog, big, small):
        sched.add(r)
    plan = sched.schedule()
    assert [r for r, _, _ in plan.prefill] == [hog]
    assert list(sched.waiting) == [big, small], "FCFS: a later request must not overtake the head"
    assert big.blocks == [] and big.num_computed == 0 and bm.num_used == 3


def test_prefill_is_chunked_within_max_num_tokens():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=10, decode_steps=4)
    long, short = _req(0, 25, 3), _req(1, 5, 3)
    sched.add(long)
    sched.add(short)
    chunks = []
    for _ in range(3):
        plan = sched.schedule()
        assert sum(e - s for _, s, e in plan.prefill) <= 10
        chunks.append([(r.request_id, s, e) for r, s, e in plan.prefill])
        _apply(sched, plan)
    assert chunks == [[(0, 0, 10)], [(0, 10, 20)], [(0, 20, 25), (1, 0, 5)]]
    assert long.output.token_ids == [_token(long, 0)], "the sample comes only after the last chunk"
    # decode runs do not use the prefill budget
    plan = sched.schedule()
    assert plan.decode == [long, short] and plan.prefill == []


def test_prefill_call_padded_shape_stays_within_max_num_tokens():
    """A prefill call is padded to (row bucket) x (chunk-length bucket): one long chunk beside many
    short ones must not make a call of rows x long positions (128 x 1024 at 70B overflowed an H200)."""
    bm = BlockManager(4096, 16)
    sched = Scheduler(bm, max_batch_size=64, max_num_tokens=1024, decode_steps=4)
    reqs = [_req(0, 1000, 3)] + [_req(i, 8, 3) for i in range(1, 60)] + [_req(60, 200, 3)]
    for r in reqs:
        sched.add(r)
    shapes, steps = [], 0
    while any(r.num_computed < len(r.all_ids) - 1 for r in reqs) and steps < 20:
        plan = sched.schedule()
        steps += 1
        if plan.prefill:
            rows = _pow2(len(plan.prefill))
            length = max(16, _pow2(max(e - s for _, s, e in plan.prefill)))
            assert rows * length <= max(1024, 16 * rows), (rows, length)
            assert sum(e - s for _, s, e in plan.prefill) <= 1024
            shapes.append((rows, length))
        _apply(sched, plan)
    assert shapes[0] == (1, 1024), "the long prompt alone first: nothing else fits beside 1024 positions"
    assert shapes[1] == (64, 16), "then the short prompts batch together (64 x 16 positions)"
    assert all(r.num_computed >= len(r.prompt_token_ids) for r in reqs), "every prompt was prefilled"


def test_prefill_first_while_requests_wait_for_slots():
    """Admission steps hold the running rows' decode back while requests still wait for a slot, so
    a burst fills the batch in as many steps as its prompts need -- not one decode call per step --
    and the decode rows run once the batch is full; a streak of such steps is bounded."""
    bm = BlockManager(256, 4)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=16, decode_steps=4)
    first = _req(0, 8, 20)
    sched.add(first)
    _apply(sched, sched.schedule())  # first prefilled, now decoding
    for i in range(1, 6):
        sched.add(_req(i, 16, 20))  # each fills a step's budget alone
    kinds = []
    for _ in range(4):
        plan = sched.schedule()
        kinds.append(([r.request_id for r, _, _ in plan.prefill], [r.request_id for r in plan.decode]))
        _apply(sched, plan)
    assert kinds == [([1], []), ([2], []), ([3], [0, 1, 2]), ([], [0, 1, 2, 3])], kinds
    assert sched.num_deferred_decodes == 3  # request 0 twice, request 1 once; 4 and 5 wait

    # the streak is bounded: the decode rows run after max_prefill_streak prefill-only steps
    sched = Scheduler(BlockManager(4096, 4), max_batch_size=64, max_num_tokens=16, decode_steps=4)
    sched.max_prefill_streak = 2
    sched.add(_req(0, 4, 50))
    _apply(sched, sched.schedule())
    for i in range(1, 10):
        sched.add(_req(i, 16, 4))
    decoded = []
    for _ in range(6):
        plan = sched.schedule()
        decoded.append(bool(plan.decode))
        _apply(sched, plan)
    assert decoded == [False, False, True, False, False, True]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_preemption_takes_the_newest_request_and_requeues_it_at_the_head():
    bm = BlockManager(9, 4)
    sched = Scheduler(bm, max_batch_size=3, max_num_tokens=100, decode_steps=4)
    r0, r1, r2, r3 = (_req(i, 4, 40) for i in range(4))
    for r in (r0, r1, r2, r3):
        sched.add(r)
    _apply(sched, sched.schedule())  # r0..r2 admitted (1 block each), r3 waits for a slot
    assert sched.running == [r0, r1, r2] and list(sched.waiting) == [r3]
    _apply(sched, sched.schedule())  # decode: 2 blocks each
    _apply(sched, sched.schedule())  # decode: 3 blocks each: the pool (9) is full
    assert bm.num_free == 0 and sched.num_preemptions == 0
    generated = list(r2.output.token_ids)
    r2_blocks = list(r2.blocks)
    assert len(generated) == 9

    plan = sched.schedule()  # r0 and r1 need a 4th block each: r2 (newest) gives its blocks
    assert plan.preempted == [r2]
    assert plan.decode == [r0, r1], "r1 must get its block from r2, not be preempted itself"
    assert sched.running == [r0, r1]
    assert list(sched.waiting) == [r2, r3], "the preempted request goes back to the head of the queue"
    assert r2.status is Status.WAITING
    assert r2.num_computed == 0 and r2.blocks == [] and r2.block_hashes == [], "its KV is reset"
    assert r2.output.token_ids == generated and r2.all_ids == r2.prompt_token_ids + generated, (
        "what it generated is kept, to be recomputed as prompt"
    )
    assert sched.num_preemptions == 1
    # its blocks went back to the pool: two were reused for r0 and r1 (its tail first), its first
    # block stays free and still in the prefix cache
    assert bm.num_used == 8 and bm.num_free == 1
    assert set(r0.blocks[-1:] + r1.blocks[-1:]) == set(r2_blocks[1:])
    assert bm.match_prefix(r2.all_ids) == r2_blocks[:1]


def test_the_oldest_request_always_gets_its_blocks():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=12)
    old, mid, new = _req(0, 4, 40), _req(1, 4, 40), _req(2, 4, 40)
    for r in (old, mid, new):
        sched.add(r)
    plan = sched.schedule()
    assert [r for r, _, _ in plan.prefill] == [old, mid, new]
    _apply(sched, plan)  # one block each, one left free
    plan = sched.schedule()  # old wants 16 KV slots (3 more blocks): both others must go, newest first
    assert plan.preempted == [new, mid]
    assert plan.decode == [old] and plan.prefill == []
    assert sched.running == [old] and len(old.blocks) == 4
    assert list(sched.waiting) == [mid, new], "the preempted keep their arrival order at the head"
    assert sched.num_preemptions == 2
    _apply(sched, plan)
    assert len(old.output.token_ids) == 1 + 12


def test_the_newest_request_preempts_itself_when_nobody_is_younger():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_batch_size=8, max_num_tokens=100, decode_steps=4)
    a, b = _req(0, 4, 8), _req(1, 4, 8)
    sched.add(a)
    sched.add(b)
    _apply(sched, sched.schedule())  # one block each, one free
    a_blocks = list(a.blocks)
    plan = sched.schedule()  # a takes the free block; b finds none and goes itself
    assert plan.decode == [a] and plan.preempted == [b]
    assert a.blocks[:1] == a_blocks and len(a.blocks) == 2
    assert list(sched.waiting) == [b] and b.blocks == [] and b.num_computed == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_through_a_small_pool_finishes_everything(seed):
    """Many requests through a pool that fits few at once: every one finishes with exactly its
    tokens, the oldest running request is never preempted, and every block comes back."""
    rng = np.random.default_rng(seed)
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_batch_size=6, max_num_tokens=24, decode_steps=3)
    reqs = []
    for i in range(30):
        plen = int(rng.integers(1, 30))
        mt = int(rng.integers(1, 64 - plen))  # every request alone fits the pool (16 x 4 = 64 slots)
        reqs.append(_req(i, plen, mt))
    pending = list(reqs)
    finished = []
    stalled = 0
    for step in range(5000):
        while pending and rng.random() < 0.5:  # requests keep arriving while others run
            sched.add(pending.pop(0))
        if not sched.has_work:
            if not pending:
                break
            continue
        oldest = sched.running[0] if sched.running else None
        plan = sched.schedule()
        assert not plan.empty, "a step with work must plan something (no deadlock)"
        if oldest is not None:  # the oldest running request progresses, waiting at most a prefill-first streak
            assert oldest not in plan.preempted
            if oldest in plan.decode or any(r is oldest for r, _, _ in plan.prefill):
                stalled = 0
            else:
                stalled += 1
                assert stalled <= Scheduler.max_prefill_streak and plan.prefill and sched.waiting
        else:
            stalled = 0
        for r in plan.preempted:
            if r in sched.waiting:
                assert r.blocks == [] and r.num_computed == 0 and r.status is Status.WAITING
            else:  # re-admitted in the same step from what stayed in the prefix cache
                assert r in sched.running and r.status is Status.RUNNING
                assert [s for q, s, _ in plan.prefill if q is r] == [r.num_computed]
                assert r.num_computed % bm.block_size == 0
        assert bm.num_used <= bm.num_blocks
        assert len(sched.running) <= 6
        finished += _apply(sched, plan)
    else:
        pytest.fail("the workload did not finish")
    assert sorted(r.request_id for r in finished) == list(range(30)), "every request finishes exactly once"
    for r in reqs:
        assert r.output.token_ids == [_token(r, i) for i in range(r.params.max_tokens)]
        assert r.output.finish_reason == "length"
    assert sched.num_preemptions > 0, "the pool was meant to be too small: nothing was preempted"
    assert bm.num_used == 0 and all(x == 0 for x in bm.ref)
    assert sched.running == [] and not sched.waiting
