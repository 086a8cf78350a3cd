"""The engine: a background thread that runs scheduler plans on the model runner.

Callers submit requests (``add_request`` returns a ``RequestHandle``) from any thread or event loop;
the engine thread admits them between device calls, so new work joins while other requests
decode. Each step: the scheduler plans prefill chunks and decode runs, the runner executes them,
and the host applies the tokens (detokenization, stop strings) and publishes outputs — at the
start of the next step, before its device calls (see ``_step``). A step that only prefills leaves
its call running and collects it in the next step, after dispatching that step's own call, so the
host's work between consecutive prefill calls overlaps the device's (``Engine.overlap_prefill``).
With ``Engine.overlap_decode`` (by default where a decode call runs a fixed loop: decode calls of
up to 256 rows on GPUs) decode calls chain the same way: while nothing but the same rows'
decoding is left to do, the next call of those rows is dispatched from the state the last one
returns, before the last one is collected (see ``_chain_decode``).

If a step raises, every in-flight request fails with that cause and the engine is dead: later
submissions raise ``EngineDeadError``. ``shutdown`` stops and joins the thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import gc
import os
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..runner import ModelRunner, RowState, bucket
from ..sampling import BadWordsState, PenaltyState, SamplingArrays
from ..switches import env_auto_flag, env_flag
from .block_manager import BlockManager
from .request import Request, RequestHandle, Status
from .scheduler import Plan, Scheduler, prefill_length_cap

# Prefill calls past position 0 (cached prefixes, later chunks) through the Pallas prefill kernel get
# block tables at least this wide (Engine.cached_prefill_width), so their programs depend on rows and
# chunk length only.
CACHED_PREFILL_MIN_TOKENS = 4096

# Decode calls of at most this many rows may run one step fewer to align the rest with max_tokens
# (Engine._call_steps).
ALIGN_MAX_ROWS = 4

_build_penalties = jax.jit(PenaltyState.build, static_argnums=0)


class _GcFreeze:
    """Python's garbage collector kept off the objects that existed before serving began, while any
    engine works (gc.freeze when the first engine gets work, gc.unfreeze when the last goes idle).
    A process that has loaded and precompiled a model holds a great many objects (traced programs,
    modules, caches); a full collection walks all of them, and while serving such collections come
    from the engine's own allocations (per-token lists, inputs) and stop its thread in the middle
    of a step. Frozen objects are not walked; unfreezing when idle leaves nothing uncollectable.
    Process-wide (gc.freeze is), so counted over every engine of the process."""

    lock = threading.Lock()
    busy = 0

    @classmethod
    def enter(cls) -> None:
        with cls.lock:
            cls.busy += 1
            if cls.busy == 1:
                gc.freeze()

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.busy -= 1
            if cls.busy == 0:
                gc.unfreeze()


class EngineDeadError(RuntimeError):
    """The engine failed (or was shut down) and takes no more work."""


class _DecodeCarry(NamedTuple):
    """What a decode call leaves for the next one of the same rows (Engine._decode_inputs)."""

    rows: list  # per row: where the call left its request (`where`)
    state: RowState  # the call's output state, on the devices
    tables: jax.Array  # the block tables it ran with
    blocks: list  # a copy of each row's blocks then

    @staticmethod
    def where(r: Request) -> tuple:
        """A request's identity, newest token, length and generated count: what its row state follows."""
        return r, r.all_ids[-1], len(r.all_ids), r.num_generated

    @classmethod
    def after(cls, reqs: list[Request], state: RowState, tables) -> "_DecodeCarry":
        return cls([cls.where(r) for r in reqs], state, tables, [list(r.blocks) for r in reqs])


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        *,
        max_batch_size: int,
        max_num_tokens: int,
        max_seq_len: int,
        decode_steps: int,
        enable_block_reuse: bool = True,
        stats_history: int = 1000,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.block_size = runner.block_size
        self.max_blocks_per_seq = -(-max_seq_len // self.block_size)
        self.blocks = BlockManager(runner.num_blocks, self.block_size, enable_block_reuse)
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_num_tokens, decode_steps)
        # seconds spent in each part of the engine step, and how many times (bench reports them):
        # text, schedule, {prefill,decode}_{inputs,call,fetch,collect}. A phase's time includes any wait on
        # the device it blocks on: on a GPU a decode call's includes its device time (dispatching a
        # while loop blocks until it ends); a prefill's device time falls where its result is read
        # (prefill_fetch), less what the host did meanwhile (with overlap_prefill, the next step's
        # schedule and prefill inputs and dispatch). prefill_call: dispatch and the KV bookkeeping.
        self.phase_seconds: collections.Counter = collections.Counter()
        self.phase_calls: collections.Counter = collections.Counter()
        self._mark_time = 0.0
        self.stats: collections.deque[dict] = collections.deque(maxlen=stats_history)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Request] = []
        self._aborts: set[int] = set()
        self._live: dict[int, Request] = {}  # every accepted, unfinished request (engine thread)
        self._text_pending: set[Request] = set()  # requests with tokens not yet turned into text
        # A prefill-only step's (plan, call result), dispatched and not yet collected: the next step
        # collects it after dispatching its own prefill call (see _step). JAXLLM_OVERLAP=0: off, each
        # call is collected in its own step.
        self._pending: tuple[Plan, tuple] | None = None
        self.overlap_prefill = env_flag("JAXLLM_OVERLAP", default="1")
        # A decode call dispatched and not yet collected: (its rows, its result, its tables, the
        # rows' blocks then). A decode-only step leaves its call running and the next step
        # dispatches the same rows' next call before collecting it (_chain_decode). It pays only
        # where dispatching a decode call does not wait for it: a fixed loop (ModelRunner.
        # decode_check_every), so by default (None, JAXLLM_OVERLAP_DECODE=auto) exactly there;
        # JAXLLM_OVERLAP_DECODE=1 / 0 (True / False) chains always / never.
        self._pending_decode: tuple | None = None
        self.overlap_decode: bool | None = env_auto_flag("JAXLLM_OVERLAP_DECODE")
        # ... and a prefill-only step's requests' first decode call, dispatched right after their
        # prefill call (_decode_after_prefill) where decode calls chain; JAXLLM_DECODE_AFTER_PREFILL=0: off
        self.decode_after_prefill = env_flag("JAXLLM_DECODE_AFTER_PREFILL", default="1")
        # the objects made before serving kept out of the garbage collector's walks while this
        # engine works (_GcFreeze); JAXLLM_GC_FREEZE=0: off
        self.gc_freeze = env_flag("JAXLLM_GC_FREEZE", default="1")
        self._gc_held = False
        # decode calls to chain dispatched from a thread of their own (JAXLLM_DISPATCH_THREAD=1):
        # then every decode call chains, its loop fixed or not (_chains_decode) -- a dispatch that
        # waits for its loop (XLA:GPU reads a while loop's predicate on the host; a fixed loop's
        # launches can fill CUDA's queue at 1024 rows) blocks that thread, not the engine's, which
        # collects the last call meanwhile (jaxlib releases the GIL while a program runs). Opt-in:
        # 3% slower at 1000 x 128/128 on an H100 (BENCHMARKS.md, twenty-first session)
        self.dispatch_thread = env_flag("JAXLLM_DISPATCH_THREAD")
        self._dispatcher: concurrent.futures.ThreadPoolExecutor | None = None
        # a fixed-loop call of rows one token past a multiple of decode_steps runs one step fewer
        # (_call_steps); JAXLLM_ALIGN_DECODE=0: off
        self.align_decode_calls = env_flag("JAXLLM_ALIGN_DECODE", default="1")
        # decode calls made, by loop ("fixed", "while", "every N") and "chained" (cleared with the
        # phase times: LLM.reset_phase_times)
        self.decode_loops: collections.Counter[str] = collections.Counter()
        # what the last decode call left for the next one to pass on (_decode_inputs); not across
        # processes, where process 0 sends every call's inputs
        self._last_decode: _DecodeCarry | None = None
        self.reuse_decode_state = self.runner._mirror is None
        self._replicated = NamedSharding(self.runner.mesh, PartitionSpec()) if self.runner._mirror is None else None
        self.check_reused_state = False  # tests: compare each reused state with the host-built one
        # Decode calls run at least this many rows (padding rows are done from the start), for A/B runs:
        # on the H100 a batch-1 step's RMSNorm is three kernels ([1, E] reduces to a scalar) where
        # several rows get one row-reduction fusion, and a 2-row GEMV reads the same weight bytes.
        self.min_decode_rows = max(1, int(os.environ.get("JAXLLM_DECODE_MIN_ROWS", "1")))
        self.num_reused_decode_states = 0
        self._stop = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread) ----------------------------------------------------------
    def add_request(self, req: Request, listener=None) -> RequestHandle:
        """Queue req; `listener(output, error)`, if given, hears every output before any arrives."""
        handle = RequestHandle(req.request_id, req.streaming, self)
        handle._listener = listener
        req.handle = handle
        req.start_detokenizer(self.tokenizer)
        with self._lock:
            self._check_alive()
            self._incoming.append(req)
            self._wake.notify()
        return handle

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._wake.notify()

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead after an error: {self._dead!r}; create a new LLM")
        if self._stop:
            raise EngineDeadError("the engine has been shut down; create a new LLM")

    def precompile(self, max_len: int, greedy: bool = True, sampled: bool = True, workers: int | None = None,
                   min_len: int = 1, cached_prefixes: bool = True) -> dict:
        """Compile, before any request, the step programs that requests of up to `max_len` tokens
        (prompt + output) will need: decode for every batch-row bucket x block-table width, and
        whole-prompt prefill for every row bucket x prompt-length bucket that fits the token
        budget -- each for all-greedy batches (`greedy`) and batches that sample (`sampled`).
        Without it the first request of each new shape waits for its compilation (seconds on a
        GPU at 8B). Programs compile on several threads into the persistent compilation cache,
        then each is called once on inputs that change nothing; a later start with the same cache
        only loads them. Returns {"programs": n, "seconds": s}.
        `cached_prefixes`: also the prefill programs of prompts past a cached prefix and of later
        chunks of long prompts (every row x chunk-length bucket, at the tables of
        `cached_prefill_width`). (Logprobs, penalties and bad words still compile on first use.)
        `min_len`: every prompt will have at least this many tokens, so shorter prompt-length
        buckets and narrower block tables are left out."""
        calls = self._warmup_calls(max_len, [g for g, on in ((True, greedy), (False, sampled)) if on], min_len,
                                   cached_prefixes)
        t0 = time.perf_counter()
        with self._lock:  # the engine thread waits (and submissions queue) until this is done
            self._check_alive()
            if (self._live or self._incoming or self.scheduler.has_work or self._text_pending or self.blocks.num_used
                    or self._in_flight):
                raise RuntimeError("precompile() must run before any request is submitted")
            self.blocks.forget_cached()  # the prefill calls overwrite free blocks: no prefix may point at them
            if jax.config.jax_compilation_cache_dir and (workers or 2) > 1:
                self.runner.compile_ahead(calls, workers)
            out = [self.runner.call(*c) for c in calls]
            jax.block_until_ready(out)
        return {"programs": len(calls), "seconds": time.perf_counter() - t0}

    def _warmup_calls(self, max_len: int, greedy_variants: list[bool], min_len: int = 1,
                      cached_prefixes: bool = False) -> list[tuple]:
        """The (kind, statics, args) of every step shape `precompile` covers, on inputs that change
        nothing a request can see: decode rows are all done (the loop runs no step), prefill rows
        write into free blocks."""
        sched, bs = self.scheduler, self.block_size
        rows_buckets = sorted({bucket(n, 1, sched.max_batch_size) for n in range(1, sched.max_batch_size + 1)})
        decode_rows = sorted({self._decode_rows(n) for n in range(1, sched.max_batch_size + 1)})
        max_blocks = min(self.max_blocks_per_seq, -(-max_len // bs))
        min_blocks = min(max_blocks, -(-min_len // bs))  # a row holds its prompt at least
        widths = sorted({bucket(n, 1, self.max_blocks_per_seq) for n in range(min_blocks, max_blocks + 1)})
        calls = []
        for rows in decode_rows:
            state = self._row_state([], rows)  # every row done
            for width in widths:
                tables = self._put(np.zeros((rows, width), np.int32))  # as the engine stages its inputs
                for g in greedy_variants:  # and the tail calls' loop where it is another program
                    for tail in (False, True) if self._tail_loop_differs(rows) else (False,):
                        calls.append(self.runner.decode_call(tables, state, sched.decode_steps, None, g, tail))
                    if self._aligns(rows):  # the aligning call's fixed loop (_call_steps)
                        calls.append(self.runner.decode_call(tables, state, sched.decode_steps - 1, None, g, False))
        t_max = min(max_len, sched.max_num_tokens)
        t_buckets = sorted({bucket(n, 16, sched.max_num_tokens) for n in range(min(min_len, t_max), t_max + 1)})
        # (chunk length bucket, table widths, fresh): whole prompts, then chunks past a cached prefix
        kinds = []
        for t in t_buckets:
            lengths = range(max(t // 2 + 1 if t > 16 else 1, min_len), min(t, t_max) + 1)  # the prompts it serves
            kinds.append((t, sorted({bucket(-(-n // bs), 1, self.max_blocks_per_seq) for n in lengths}), True))
        if cached_prefixes:
            c_widths = sorted({self.cached_prefill_width(n) for n in range(min_blocks, max_blocks + 1)})
            kinds += [(t, c_widths, False) for t in sorted({bucket(n, 16, sched.max_num_tokens) for n in range(1, t_max + 1)})]
        seen = set()
        for t, p_widths, fresh in kinds:
            for rows in rows_buckets:
                if t > prefill_length_cap(rows, sched.max_num_tokens):
                    break  # the scheduler keeps a prefill call's padded shape within the budget
                state = self._row_state([], rows)
                tok, pos, valid, last = self._put((np.zeros((rows, t), np.int32),
                                                   np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
                                                   np.ones((rows, t), np.bool_), np.full((rows,), t - 1, np.int32)))
                for width in p_widths:
                    # table rows of free blocks, so the writes land where nothing lives
                    tables = self._put(np.arange(rows * width, dtype=np.int32).reshape(rows, width) % self.runner.num_blocks)
                    for g in greedy_variants:
                        call = self.runner.prefill_call(tok, pos, valid, tables, last, state, None, g, fresh=fresh)
                        key = (rows, t, width, tuple(sorted(call[1].items())))  # fresh and not: one program
                        if key not in seen:  # where the runner has no separate whole-prompt path
                            seen.add(key)
                            calls.append(call)
        return calls

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        """The engine thread: _serve, then what it holds let go however it ends (a failure or
        shutdown): its hold on _GcFreeze and the dispatch thread."""
        try:
            self._serve()
        finally:
            self._hold_gc(False)
            if self._dispatcher is not None:
                self._dispatcher.shutdown()

    def _hold_gc(self, on: bool) -> None:
        """Hold _GcFreeze (gc_freeze) from work arriving until the engine goes idle."""
        if on and self.gc_freeze and not self._gc_held:
            _GcFreeze.enter()
            self._gc_held = True
        elif not on and self._gc_held:
            _GcFreeze.leave()
            self._gc_held = False

    def _serve(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (
                        self._stop or self._incoming or self._aborts or self.scheduler.has_work or self._text_pending
                        or self._in_flight
                    ):
                        self._hold_gc(False)
                        self._wake.wait()
                    if self._stop:
                        break
                    self._hold_gc(True)
                    incoming, self._incoming = self._incoming, []
                    aborts, self._aborts = self._aborts, set()
                for req in incoming:
                    self._live[req.request_id] = req
                    self.scheduler.add(req)
                for rid in aborts:
                    req = self._live.get(rid)
                    if req is not None:
                        req.finish("cancelled")
                        self._retire(req)
                if self.scheduler.has_work or self._text_pending or self._in_flight:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - every failure must reach the waiting callers
            with self._lock:
                self._dead = e
                stranded = list(self._live.values()) + self._incoming
                self._incoming = []
            for req in stranded:
                req.handle._publish(error=e)
            self._live.clear()
            return
        # shutdown: whatever is still in flight ends with a reason, never silently
        for call in (self._pending, self._pending_decode):  # calls left running: done before the pool may go
            if call is not None:
                jax.block_until_ready(self._outputs(call[1]))
        self._pending = self._pending_decode = None
        with self._lock:
            stranded = list(self._live.values()) + self._incoming
            self._incoming = []
        for req in stranded:
            if not req.finished:
                req.finish("cancelled", "shutdown")
                req.handle._publish(req.snapshot())

    @property
    def _in_flight(self) -> bool:
        """A call dispatched and not yet collected (overlap_prefill, overlap_decode)."""
        return self._pending is not None or self._pending_decode is not None

    def _retire(self, req: Request) -> None:
        self.scheduler.release(req)
        self._text_pending.discard(req)
        self._live.pop(req.request_id, None)
        req.handle._publish(req.snapshot())

    def _step(self) -> None:
        """One engine step: turn the last step's tokens into text, schedule, run the device calls, collect.

        The text work (detokenization, stop strings, publishing) comes first, before the next
        device call: XLA:GPU evaluates while-loop conditions and ``lax.cond`` predicates on the
        host, so dispatching the decode loop blocks until it has finished and no host work could
        overlap it anyway. Done this way a first token reaches its caller as soon as its prefill
        ends (not after the next decode call), and requests ended by a stop string free their
        slots before the scheduler runs. For the same reason a step with both kinds of work
        collects its prefill, and publishes those first tokens, before dispatching its decode
        (whose inputs are built while the prefill runs).

        A step that only prefills (overlap_prefill) leaves its call on the device: the next step
        schedules, builds and dispatches its own call first and then collects the last one, so
        the device runs the calls back to back while the host prepares the next and publishes the
        last. A prefill chunk needs nothing from the chunks before it but their KV, which the
        device writes in call order; the scheduler counts a call's KV as computed when it is
        dispatched (_dispatch_prefill) and leaves out the requests whose next token it is still
        computing; once collected they join this step's decode rows (Scheduler.join_decode).
        """
        t0 = self._mark_time = time.perf_counter()
        self._apply_text()
        self._mark("text")
        new_tokens = 0
        if self._pending_decode is not None:  # the last step's decode call (overlap_decode)
            if self._pending is not None:  # chained onto the last step's prefill (_decode_after_prefill)
                pending, self._pending = self._pending, None
                new_tokens += len(self._collect_prefill(*pending))  # its first tokens go out first
                self._apply_text()
                self._mark("text")
                if self.check_reused_state and all(r.status is Status.RUNNING and not r.finished
                                                   for r in self._pending_decode[0]):
                    self._check_state(self._pending_decode[0], pending[1][3])
            (rows, result, tables, blocks), self._pending_decode = self._pending_decode, None
            result = self._outputs(result)
            chained = self._chain_decode(rows, result, tables, blocks)  # the same rows' next call, dispatched
            step_plan = Plan(decode=rows)
            new_tokens += self._collect_decode(step_plan, result)
            self._mark("decode_collect")
            self._record_step(t0, step_plan, new_tokens)  # before any of its text goes out
            if chained is not None:
                self._pending_decode = chained
                return
            if self.reuse_decode_state:
                self._last_decode = _DecodeCarry.after(rows, result[0], tables)
            t0, new_tokens = time.perf_counter(), 0  # the rest of the step: a step of its own in the stats
            self._apply_text()  # its tokens' text before this step schedules (stop strings free slots)
            self._mark("text")
        pending, self._pending = self._pending, None
        if not self.scheduler.has_work and pending is None:
            return
        plan = self.scheduler.schedule()
        self._mark("schedule")
        prefill = self._dispatch_prefill(plan) if plan.prefill else None
        if pending is not None:  # the last step's prefill call, collected while this step's runs
            got = self._collect_prefill(*pending)
            new_tokens += len(got)
            self._apply_text()  # its first tokens go out now (stop strings free their slots)
            self._mark("text")
            self.scheduler.join_decode(plan, got)
        decode_inputs = self._decode_inputs(plan) if plan.decode else None  # built while the prefill runs
        if prefill is not None and decode_inputs is None and self.overlap_prefill:
            self._pending = (plan, prefill)
            self._pending_decode = self._decode_after_prefill(plan, prefill)
        elif prefill is not None:
            new_tokens += len(self._collect_prefill(plan, prefill))
            if decode_inputs is not None:
                # the decode dispatch below blocks until its loop ends: the prefilled requests'
                # first tokens go out now, not a whole decode call later
                self._apply_text()
                self._mark("text")
        chain = decode_inputs is not None and prefill is None and self._chains_decode(plan.decode)
        decode = self._dispatch_decode(plan, *decode_inputs, later=chain) if decode_inputs is not None else None
        if chain:  # collected next step
            self._pending_decode = (plan.decode, decode, decode_inputs[0], [list(r.blocks) for r in plan.decode])
        elif decode is not None:
            new_tokens += self._collect_decode(plan, decode)
            if self.reuse_decode_state:  # what the next decode call may pass on (see _decode_inputs)
                self._last_decode = _DecodeCarry.after(plan.decode, decode[0], decode_inputs[0])
            self._mark("decode_collect")
        self._record_step(t0, plan, new_tokens)

    def _record_step(self, t0: float, plan: Plan, new_tokens: int) -> None:
        elapsed = time.perf_counter() - t0
        self.stats.append(
            dict(
                time=time.time(),
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                prefill_requests=len(plan.prefill),
                decode_requests=len(plan.decode),
                kv_blocks_used=self.blocks.num_used,
                kv_blocks_free=self.blocks.num_free,
                preemptions=self.scheduler.num_preemptions,
                prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
                new_tokens=new_tokens,
                step_seconds=elapsed,
                tokens_per_second=new_tokens / elapsed if elapsed > 0 else 0.0,
            )
        )

    def _mark(self, phase: str) -> None:
        """Add the time since the last mark to `phase` (see phase_seconds)."""
        now = time.perf_counter()
        self.phase_seconds[phase] += now - self._mark_time
        self.phase_calls[phase] += 1
        self._mark_time = now

    # -- device calls ------------------------------------------------------------------------
    def cached_prefill_width(self, blocks: int) -> int:
        """Block-table width of a prefill call that does not start every row at position 0 (a
        cached prefix, a later chunk). Through the Pallas prefill kernel, which reads only each
        row's own pages (so a wider table costs it nothing), at least the width of
        CACHED_PREFILL_MIN_TOKENS: such calls then vary in rows and chunk length only, and
        `precompile` covers them with few programs (their query length says nothing about their
        context). The jnp reference gathers every page of the table, so it keeps the bucketed width."""
        floor = 1
        if self.runner.prefill_reads_own_pages:
            floor = min(self.max_blocks_per_seq, -(-CACHED_PREFILL_MIN_TOKENS // self.block_size))
        return bucket(blocks, floor, self.max_blocks_per_seq)

    def _put(self, tree):
        """Host arrays (a pytree) onto the devices in one batched transfer, committed and replicated
        on the mesh: the sharding the decode program's outputs have, so a decode state passed on
        from the last call (see _decode_inputs) and a host-built one are the same program's inputs
        (an uncommitted input would make each shape compile twice). Where process 0 announces
        every call to the others (several hosts), uncommitted local arrays as before."""
        if self._replicated is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.device_put(tree, self._replicated)

    def _tables(self, reqs: list[Request], rows: int, width: int | None = None,
                num_blocks: list[int] | None = None) -> jax.Array:
        """Block tables [rows, width]: each request's blocks (its first num_blocks[i] only, if given)."""
        if num_blocks is None:
            num_blocks = [len(r.blocks) for r in reqs]
        if width is None:
            width = bucket(max(num_blocks), 1, self.max_blocks_per_seq)
        tables = np.zeros((rows, width), np.int32)
        for i, (r, n) in enumerate(zip(reqs, num_blocks)):
            tables[i, :n] = r.blocks[:n]
        return self._put(tables)

    def _row_state(self, reqs: list[Request], rows: int) -> RowState:
        vocab = self.runner.cfg.vocab_size
        k = bucket(max([len(r.stop_ids) for r in reqs] + [1]), 4)
        stop_ids = np.full((rows, k), vocab, np.int32)
        last = np.zeros((rows,), np.int32)
        pos = np.zeros((rows,), np.int32)
        num = np.zeros((rows,), np.int32)
        max_t = np.ones((rows,), np.int32)
        min_t = np.zeros((rows,), np.int32)
        done = np.ones((rows,), np.bool_)
        for i, r in enumerate(reqs):
            stop_ids[i, : len(r.stop_ids)] = r.stop_ids
            last[i] = r.all_ids[-1]
            pos[i] = len(r.all_ids) - 1
            num[i] = r.num_generated
            max_t[i] = r.params.max_tokens
            min_t[i] = r.params.min_tokens or 0
            done[i] = False
        return self._put(RowState(
            tokens=last,
            positions=pos,
            num_generated=num,
            max_tokens=max_t,
            min_tokens=min_t,
            stop_ids=stop_ids,
            done=done,
            sampling=SamplingArrays.from_requests([r.params for r in reqs], [r.key_data for r in reqs], rows, on_host=True),
            penalty=self._penalty_state(reqs, rows),
            bad_words=self._bad_words_state(reqs, rows),
        ))

    def _bad_words_state(self, reqs: list[Request], rows: int) -> BadWordsState | None:
        if not any(r.bad_ids or r.bad_seqs for r in reqs):
            return None
        vocab = self.runner.cfg.vocab_size
        k = bucket(max([len(r.bad_ids) for r in reqs] + [1]), 4)
        m = bucket(max([len(r.bad_seqs) for r in reqs] + [1]), 4)
        width = max([len(s) for r in reqs for s in r.bad_seqs] + [1]) - 1  # longest prefix
        width = bucket(width, 1) if width else 0
        banned = np.full((rows, k), vocab, np.int32)
        prefixes = np.full((rows, m, width), BadWordsState.WILDCARD, np.int32)
        lasts = np.full((rows, m), vocab, np.int32)
        history = np.full((rows, width), -1, np.int32)
        for i, r in enumerate(reqs):
            banned[i, : len(r.bad_ids)] = r.bad_ids
            for j, seq in enumerate(r.bad_seqs):
                prefixes[i, j, width - (len(seq) - 1) :] = seq[:-1]
                lasts[i, j] = seq[-1]
            if width:
                tail = r.all_ids[-width:]
                history[i, width - len(tail) :] = tail
        return BadWordsState(banned, prefixes, lasts, history)  # host arrays: _row_state moves them

    def _penalty_state(self, reqs: list[Request], rows: int) -> PenaltyState | None:
        if not any(r.params.has_penalties for r in reqs):
            return None
        vocab = self.runner.cfg.vocab_size
        lp = bucket(max(len(r.prompt_token_ids) for r in reqs), 16)
        lo = bucket(max(r.num_generated for r in reqs) + 1, 16)
        prompt_ids = np.full((rows, lp), vocab, np.int32)
        output_ids = np.full((rows, lo), vocab, np.int32)
        rep, pres, freq = np.ones((rows,), np.float32), np.zeros((rows,), np.float32), np.zeros((rows,), np.float32)
        for i, r in enumerate(reqs):
            prompt_ids[i, : len(r.prompt_token_ids)] = r.prompt_token_ids
            out = r.all_ids[len(r.prompt_token_ids) :]
            output_ids[i, : len(out)] = out
            rep[i], pres[i], freq[i] = r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty
        return _build_penalties(vocab, *map(jnp.asarray, (prompt_ids, output_ids, rep, pres, freq)))

    def _after_compute(self, req: Request, num_computed: int) -> None:
        """Record req's computed KV and register the blocks that became full (only those)."""
        req.num_computed = num_computed
        known = len(req.block_hashes)
        hashes = req.full_block_hashes(self.block_size)
        for b, h in zip(req.blocks[known:], hashes[known:]):
            self.blocks.register(b, h)

    def _receive(self, req: Request, tid: int, info: dict, device_end: bool) -> None:
        req.receive(tid, info, device_end)
        self._received(req, device_end)

    def _received(self, req: Request, device_end: bool) -> None:
        """req got tokens (Request.receive): its text is made next step; `device_end`: the device
        ended it, so its slot and blocks go back now."""
        self._text_pending.add(req)
        if device_end:
            self.scheduler.release(req)

    def _apply_text(self) -> None:
        """Turn received tokens into output text; retire finished requests, stream the others."""
        for req in list(self._text_pending):
            if req.apply_pending():
                self._retire(req)
            elif req.streaming and len(req.output.token_ids) > req._sent_tokens:
                req.handle._publish(req.snapshot())
        self._text_pending.clear()

    def _dispatch_prefill(self, plan: Plan):
        reqs = [r for r, _, _ in plan.prefill]
        rows = bucket(len(reqs), 1, self.scheduler.max_batch_size)
        t = bucket(max(end - start for _, start, end in plan.prefill), 16, self.scheduler.max_num_tokens)
        tokens = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, t), np.int32)
        valid = np.zeros((rows, t), np.bool_)
        last_idx = np.zeros((rows,), np.int32)
        asked = [r.params.prompt_logprobs for r in reqs if r.needs_prompt_logprobs]
        targets = np.full((rows, t), -1, np.int32) if asked else None
        for i, (r, start, end) in enumerate(plan.prefill):
            n = end - start
            tokens[i, :n] = r.all_ids[start:end]
            if targets is not None and r.needs_prompt_logprobs:  # the next prompt token at each position
                nxt = r.prompt_token_ids[start + 1 : end + 1]
                targets[i, : len(nxt)] = nxt
            positions[i, :n] = np.arange(start, end)
            positions[i, n:] = end  # padding: masked out of the KV write, harmless as queries
            valid[i, :n] = True
            last_idx[i] = n - 1
        fresh = all(start == 0 for _, start, _ in plan.prefill)
        # a chunk reads and writes its row's pages up to its own end only: the table covers those
        # (a first chunk of a long prompt then has a whole prompt's shape, which precompile knows)
        need = [-(-end // self.block_size) for _, _, end in plan.prefill]
        width = bucket(max(need), 1, self.max_blocks_per_seq) if fresh else self.cached_prefill_width(max(need))
        tokens, positions, valid, last_idx, targets = self._put((tokens, positions, valid, last_idx, targets))
        args = (tokens, positions, valid, self._tables(reqs, rows, width, need), last_idx, self._row_state(reqs, rows))
        self._mark("prefill_inputs")
        out = self.runner.prefill(
            *args,
            num_logprobs=self._num_logprobs(reqs),
            all_greedy=all(r.params.is_greedy for r in reqs),
            targets=targets,
            prompt_logprobs=self._top_count(asked),
            fresh=fresh,
        )
        # the chunks' KV counts as computed now, while the device computes it: every later call runs
        # after this one, so a later chunk, or a prefix reuse of these blocks, reads it written
        for r, _, end in plan.prefill:
            self._after_compute(r, end)
        self._mark("prefill_call")
        return out

    @staticmethod
    def _top_count(asked: list[int]) -> int | None:
        """How many top tokens the device reports (a power of two), None if nobody asks."""
        return bucket(max(asked + [1]), 1) if asked else None

    @classmethod
    def _num_logprobs(cls, reqs: list[Request]) -> int | None:
        return cls._top_count([r.params.logprobs for r in reqs if r.params.logprobs is not None])

    def _collect_prefill(self, plan: Plan, result) -> list[Request]:
        """Apply a prefill call's results; returns the requests it gave their next token."""
        tok, info, prompt_info = jax.device_get(result[:3])
        self._mark("prefill_fetch")
        got = []
        for i, (r, start, end) in enumerate(plan.prefill):
            if r.status is not Status.RUNNING:  # ended (stop string, abort) or preempted while this call ran
                continue
            if prompt_info is not None and r.needs_prompt_logprobs:
                count = min(end, len(r.prompt_token_ids) - 1) - start  # positions whose next token is a prompt token
                r.receive_prompt_logprobs(start + 1, {k: v[i] for k, v in prompt_info.items()}, max(count, 0))
            if end == len(r.all_ids):  # prompt complete: the sample is the next token
                tid = int(tok[i])
                end_here = tid in r.stop_ids or r.num_generated + 1 >= r.params.max_tokens
                self._receive(r, tid, {k: v[i] for k, v in info.items()}, end_here)
                got.append(r)
        self._mark("prefill_collect")
        return got

    def _decode_inputs(self, plan: Plan):
        """Block tables and row state of a decode call. When the rows are the last decode call's
        requests, in the same order, each exactly where that call left it (same newest token,
        position and count: nothing but that call changed them), the state that call returned
        is still on the device and is passed on as it is, and so are the tables if no row gained
        a block: nothing is built on the host or copied to the devices between such calls."""
        reqs, rows = plan.decode, self._decode_rows(len(plan.decode))
        last, self._last_decode = self._last_decode, None
        same = last is not None and last.tables.shape[0] == rows and last.rows == [_DecodeCarry.where(r) for r in reqs]
        tables = last.tables if same and last.blocks == [r.blocks for r in reqs] else self._tables(reqs, rows)
        state = last.state if same else self._row_state(reqs, rows)
        if same and self.check_reused_state:  # tests: the reused state is the one the host would build
            self._check_state(reqs, state)
        self.num_reused_decode_states += int(same)
        self._mark("decode_inputs")
        return tables, state

    def _check_state(self, reqs: list[Request], state: RowState) -> None:
        """Tests (check_reused_state): a state passed on on the device is the one the host would build."""
        fresh = self._row_state(reqs, state.tokens.shape[0])
        for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(state), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), "reused decode state differs from the host's"

    def _decode_rows(self, n: int) -> int:
        """Rows of a decode call for n requests: their bucket, at least min_decode_rows."""
        return max(self.min_decode_rows, bucket(n, 1, self.scheduler.max_batch_size))

    def _dispatch_decode(self, plan: Plan, tables, state, ahead: int = 0, later: bool = False):
        """A decode call of plan.decode's rows; `ahead`: decode steps already dispatched for them
        and not yet collected (a chained call). `later`: the call is collected in a later step;
        with dispatch_thread it is then dispatched from the dispatch thread and what comes back is
        a Future of its outputs (_outputs)."""
        reqs = plan.decode
        steps, tail, every = self._decode_loop(reqs, ahead)
        call = functools.partial(self.runner.decode, tables, state, steps, num_logprobs=self._num_logprobs(reqs),
                                 all_greedy=all(r.params.is_greedy for r in reqs), tail=tail)
        if later and self.dispatch_thread:
            if self._dispatcher is None:
                self._dispatcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-dispatch")
            out = self._dispatcher.submit(call)
        else:
            out = call()
        self.decode_loops["fixed" if every is None else "while" if every == 1 else f"every {every}"] += 1
        if ahead:
            self.decode_loops["chained"] += 1
        self._mark("decode_call")
        return out

    def _outputs(self, result):
        """A decode call's outputs: `result`, or where it is a Future (dispatch_thread), what its
        dispatch returns, once it has (time waited: phase decode_wait)."""
        if isinstance(result, concurrent.futures.Future):
            result = result.result()
            self._mark("decode_wait")
        return result

    def _tail_loop_differs(self, rows: int) -> bool:
        """Whether a tail call of `rows` rows runs another loop, hence another program (precompile)."""
        return self.runner.decode_check_every(rows, False) != self.runner.decode_check_every(rows, True)

    def _aligns(self, rows: int) -> bool:
        """Whether decode calls of `rows` rows may align (_call_steps): align_decode_calls on, a fixed
        loop's, at most ALIGN_MAX_ROWS rows (latency-bound batches; each row bucket that aligns costs
        precompile one program more per table width)."""
        return (self.align_decode_calls and self.scheduler.decode_steps > 1 and rows <= ALIGN_MAX_ROWS
                and self.runner.decode_check_every(rows, False) is None)

    def _call_steps(self, reqs: list[Request], ahead: int = 0) -> int:
        """The steps of a decode call of these requests (`ahead` steps of theirs in flight):
        decode_steps, or one fewer where the call runs a fixed loop (_aligns) and every row has made
        one token past a multiple of decode_steps -- as after a request's prefill, whose token is its
        first -- unless that shorter call would be a tail. A request's decode calls then end where its
        count of tokens reaches multiples of decode_steps, so that a max_tokens that is one (vLLM's
        default 16; the powers of two users pick) ends with a call, instead of its last token waiting
        for one more step of a fixed loop (max_tokens 128 at 16 steps a call: 15 + 7 x 16 steps, not
        8 x 16; one program more per row bucket and table width, which precompile covers)."""
        steps = self.scheduler.decode_steps
        if (self._aligns(self._decode_rows(len(reqs))) and all((r.num_generated + ahead) % steps == 1 for r in reqs)
                and not self._tail(reqs, ahead, steps - 1)):
            return steps - 1
        return steps

    def _tail(self, reqs: list[Request], ahead: int = 0, steps: int | None = None) -> bool:
        """Whether every row ends within a decode call by its max_tokens (`ahead` steps of theirs
        dispatched before it) at least an eighth of the call's steps before its end: the runner then
        runs it as a loop that ends with them (ModelRunner.decode_check_every), not a fixed one that
        would run on past them. (A while loop costs a host round trip each step -- 0.25 ms of a
        3.6 ms step at batch 1 on an H100, ~0.45 of 3.25 at tp=2, BENCHMARKS.md "Fifteenth session"
        -- so a fixed call wasting fewer steps than that is the faster.) `steps`: the call's
        (default decode_steps)."""
        steps = steps or self.scheduler.decode_steps
        left = max(r.params.max_tokens - r.num_generated for r in reqs) - ahead
        return 8 * (steps - left) >= steps

    def _decode_loop(self, reqs: list[Request], ahead: int = 0) -> tuple[int, bool, int | None]:
        """(its steps: _call_steps, whether it is a tail call, the loop it runs: ModelRunner.
        decode_check_every) of a decode call of these requests after `ahead` steps of theirs still
        in flight."""
        steps = self._call_steps(reqs, ahead)
        tail = self._tail(reqs, ahead, steps)
        return steps, tail, self.runner.decode_check_every(self._decode_rows(len(reqs)), tail)

    def _chains_decode(self, reqs: list[Request], ahead: int = 0) -> bool:
        """Whether a decode call of these requests (after `ahead` steps of theirs still in flight)
        is one to chain (overlap_decode; by default where it runs a fixed loop, whose dispatch does
        not wait for the device)."""
        if self.overlap_decode is not None:
            return self.overlap_decode
        return self.dispatch_thread or self._decode_loop(reqs, ahead)[2] is None

    def _chain_decode(self, rows: list[Request], result, tables, blocks):
        """overlap_decode: the next decode call of `rows`, dispatched from the state their last call
        (`result`, not yet collected) returns -- or None, when anything else may need the step: a request
        arriving or aborted, or whatever Scheduler.continue_decode refuses (one waiting, a row not decoding:
        prefilling, preempted, finished by a stop string or an abort; the last call ending every row by its
        max_tokens; no blocks for both calls); nor where the next call is not one to chain (_chains_decode:
        by default, a tail call ending every row by its max_tokens runs a loop that ends with them, whose
        dispatch waits for it -- collected in a step of its own), or the decode state is not passed on
        between calls (reuse_decode_state: several processes). The device runs the two calls back to back
        while the host collects the first; a row that the first call ends (EOS, max_tokens) is done in the
        state the second starts from (masked: no tokens, no KV writes), and one that a stop string ends when
        its text is made runs on in the second, its tokens dropped at collect. Returns what
        `_pending_decode` holds, or None."""
        steps = result[1].shape[1]  # the call in flight's (_call_steps)
        if (not (self._chains_decode(rows, ahead=steps) and self.reuse_decode_state) or self._incoming
                or self._aborts or not self.scheduler.continue_decode(rows, steps)):
            return None
        if blocks != [r.blocks for r in rows]:
            tables = self._tables(rows, tables.shape[0])
        self.num_reused_decode_states += 1
        self._mark("decode_inputs")
        out = self._dispatch_decode(Plan(decode=rows), tables, result[0], ahead=steps, later=True)
        return rows, out, tables, [list(r.blocks) for r in rows]

    def _decode_after_prefill(self, plan: Plan, result):
        """overlap_decode, from a prefill: the first decode call of a prefill-only step's requests,
        dispatched right after their prefill call from the state it returns (their first tokens still
        on the device), so that the device goes from one call to the next without waiting for the
        host to collect the prefill and dispatch the decode (a batch-1 request otherwise waits ~5 ms
        there on an H100, ~40 us of each of 128 tokens). Only where that call is the one the next step
        would make: the call completes the prompt of every running request (Scheduler.
        decode_after_prefill: nothing waits, blocks for the call without preempting), in admission
        order, in as many rows, with nothing arriving or aborted, and the call is one to chain
        (_chains_decode, its loop fixed). The next step collects the prefill first, then goes on as
        from any chained decode call. Returns what `_pending_decode` holds, or None."""
        reqs = [r for r, _, _ in plan.prefill]
        rows = self._decode_rows(len(reqs))
        if (not (self.decode_after_prefill and self.reuse_decode_state) or plan.preempted or self._incoming or self._aborts
                or rows != result[3].tokens.shape[0]
                or [r.admitted_seq for r in reqs] != sorted(r.admitted_seq for r in reqs)
                or not self._chains_decode(reqs, ahead=1) or not self.scheduler.decode_after_prefill(reqs)):
            return None
        tables = self._tables(reqs, rows)
        self._mark("decode_inputs")
        out = self._dispatch_decode(Plan(decode=reqs), tables, result[3], ahead=1, later=True)
        return reqs, out, tables, [list(r.blocks) for r in reqs]

    def _collect_decode(self, plan: Plan, result) -> int:
        state, toks, info = result
        toks, info, done = jax.device_get((toks, info, state.done))
        self._mark("decode_fetch")  # waits for the device where the call did not
        toks, done = toks.tolist(), done.tolist()  # Python values: per-token numpy indexing is slow at 256 rows
        info = {k: v.tolist() for k, v in info.items()}
        produced = 0
        steps = len(toks[0]) if toks else 0
        for i, r in enumerate(plan.decode):
            if r.finished:
                continue
            row = toks[i]
            n = steps - row.count(-1)  # a row's tokens are a prefix: -1 once it is done
            if n:
                r.receive_many(row[:n], {k: v[i][:n] for k, v in info.items()}, bool(done[i]))
                produced += n
                # the KV of every token but the newest is now written
                self._after_compute(r, len(r.all_ids) - 1)
                self._received(r, bool(done[i]))
        return produced
