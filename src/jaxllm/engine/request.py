"""A request's host-side state, and the handle its submitter waits on.

The request is owned by the engine thread; the handle is the only object shared with callers.
The engine publishes immutable ``RequestOutput`` snapshots into the handle; callers read them
synchronously (``result``), from asyncio (``aresult``, ``async for``), or from other threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import chain_hashes
from .detokenizer import IncrementalDetokenizer, find_stop


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    key_data: np.ndarray  # the row's raw PRNG key (from its seed)
    stop_ids: list[int]  # token ids that end it (EOS unless ignore_eos, and stop_token_ids)
    streaming: bool = False
    output: CompletionOutput = field(default_factory=lambda: CompletionOutput(index=0))
    detok: IncrementalDetokenizer | None = None
    status: Status = Status.WAITING
    # KV state: all_ids = prompt + generated; KV of all_ids[:num_computed] sits in `blocks`.
    all_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks registered so far
    admitted_seq: int = -1  # admission order (the scheduler's running list keeps the same order)
    # Tokens from the device not yet applied to `output`, one entry per device call: (ids, token info,
    # device says the final id is the last); token info: "logprob", and with logprobs requested "rank",
    # "top_ids", "top_lps", each a list with one entry per id.
    pending: list[tuple[list[int], dict, bool]] = field(default_factory=list)
    handle: "RequestHandle | None" = None
    _sent_text: int = 0
    _sent_tokens: int = 0
    bad_ids: list[int] = field(default_factory=list)  # tokens never produced (bad_token_ids, one-token bad words)
    bad_seqs: list[list[int]] = field(default_factory=list)  # multi-token bad words
    prompt_logprobs: list | None = None  # with params.prompt_logprobs: one entry per prompt position so far
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        self.all_ids = list(self.prompt_token_ids)
        self.output.cumulative_logprob = 0.0
        if self.params.logprobs is not None:
            self.output.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob

    def start_detokenizer(self, tokenizer) -> None:
        """Text output as the params ask (nothing with detokenize=False or without a tokenizer)."""
        p = self.params
        if p.detokenize and tokenizer is not None:
            self.detok = IncrementalDetokenizer(tokenizer, self.prompt_token_ids, p.skip_special_tokens,
                                                p.spaces_between_special_tokens)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions whose logprobs are still to come (their KV must be computed, not reused)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def receive_prompt_logprobs(self, first_target: int, info: dict, count: int) -> None:
        """Entries for prompt tokens first_target .. first_target + count - 1 (info: [count, ...]
        arrays); positions already recorded (a recompute after preemption) are skipped."""
        k = self.params.prompt_logprobs
        for j in range(count):
            pos = first_target + j
            if pos != len(self.prompt_logprobs):
                continue
            one = {name: v[j] for name, v in info.items()}
            self.prompt_logprobs.append(self._logprob_entry(self.prompt_token_ids[pos], one, k))

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    @property
    def num_generated(self) -> int:
        """Tokens generated so far (received from the device, applied to the output or not)."""
        return len(self.all_ids) - len(self.prompt_token_ids)

    @property
    def max_kv_tokens(self) -> int:
        """KV slots this request can ever need (its last token is never written)."""
        return len(self.prompt_token_ids) + self.params.max_tokens - 1

    def reset_kv(self) -> None:
        """Forget the KV (after preemption): everything generated so far is recomputed as prompt."""
        self.num_computed = 0
        self.blocks = []
        self.block_hashes = []

    def full_block_hashes(self, block_size: int) -> list[int]:
        """Chain hashes of every full computed block (extending the cached list)."""
        n_full = self.num_computed // block_size
        if len(self.block_hashes) < n_full:
            parent = self.block_hashes[-1] if self.block_hashes else None
            start = len(self.block_hashes) * block_size
            self.block_hashes += chain_hashes(self.all_ids[start : n_full * block_size], block_size, parent)
        return self.block_hashes

    # -- tokens in -------------------------------------------------------------------------
    def receive(self, tid: int, info: dict, last: bool) -> None:
        """A token from the device; it becomes output (text, stop strings) in apply_pending.

        `info`: the token's "logprob" (and with logprobs asked "rank", "top_ids", "top_lps");
        `last`: the device marked the row done with this token (stop token or max_tokens).
        """
        self.receive_many([tid], {k: [v] for k, v in info.items()}, last)

    def receive_many(self, tids: list[int], info: dict, last: bool) -> None:
        """Tokens of one decode call, in order: `info` maps each token-info name to a list with one
        entry per token; `last`: the device marked the row done with the final one. One entry per
        call, not per token: at 1024 rows x 16 steps the per-token objects were most of the host's
        work between two decode calls."""
        self.all_ids.extend(tids)
        self.pending.append((tids, info, last))

    def apply_pending(self) -> bool:
        """Apply the received tokens in order; True once the request is finished."""
        pending, self.pending = self.pending, []
        out, p = self.output, self.params
        for tids, info, last in pending:
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            n = len(tids)
            if self.detok is None and p.logprobs is None:  # no text, no logprob entries: ids and the sum
                out.token_ids.extend(tids[:-1])
                for lp in info["logprob"][:-1]:
                    out.cumulative_logprob += float(lp)
                if self._append(tids[-1], info, n - 1, last):
                    return True
                continue
            for j, tid in enumerate(tids):
                if self._append(tid, info, j, last and j == n - 1):
                    return True
        return False

    def _append(self, tid: int, info: dict, j: int, last: bool) -> bool:
        """Token tid (entry j of the token-info lists) joins the output; True once finished."""
        out, p = self.output, self.params
        out.token_ids.append(tid)
        out.cumulative_logprob += float(info["logprob"][j])
        if p.logprobs is not None:
            out.logprobs.append(self._logprob_entry(tid, {k: v[j] for k, v in info.items()}, p.logprobs))
        ends_by_token = last and tid in self.stop_ids
        if self.detok is not None and (not ends_by_token or p.include_stop_str_in_output):
            new_text = self.detok.add(tid)
            out.text = self.detok.text
            hit = find_stop(out.text, len(new_text), p.stop_strings) if new_text else None
            if hit is not None:
                idx, stop = hit
                out.text = out.text[: idx + len(stop)] if p.include_stop_str_in_output else out.text[:idx]
                self.finish("stop", stop)
                return True
        if last:
            if ends_by_token:
                self.finish("stop", tid if tid in (p.stop_token_ids or []) else None)
            else:
                self.finish("length")
            return True
        return False

    def _logprob_entry(self, tid: int, info: dict, k: int) -> dict[int, Logprob]:
        """{token id: Logprob} for the token and the k most likely ones."""
        decode = (lambda t: self.detok.tok.decode([t])) if self.detok is not None else (lambda t: None)
        entry = {tid: Logprob(float(info["logprob"]), int(info["rank"]), decode(tid))}
        for r, (t, lp) in enumerate(zip(info["top_ids"][:k], info["top_lps"]), start=1):
            entry.setdefault(int(t), Logprob(float(lp), r, decode(int(t))))
        return entry

    def finish(self, reason: str, stop_reason=None) -> None:
        self.output.finish_reason = reason
        self.output.stop_reason = stop_reason
        self.status = Status.FINISHED
        self.finished_time = time.perf_counter()

    # -- outputs out -----------------------------------------------------------------------
    def snapshot(self) -> RequestOutput:
        """An immutable copy of the output so far, with the text / tokens added since the last one."""
        out = self.output
        comp = dataclasses.replace(
            out,
            token_ids=list(out.token_ids),
            logprobs=list(out.logprobs) if out.logprobs is not None else None,
            text_diff=out.text[self._sent_text :],
            token_ids_diff=out.token_ids[self._sent_tokens :],
        )
        self._sent_text, self._sent_tokens = len(out.text), len(out.token_ids)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[comp],
            finished=self.finished,
            metrics=RequestMetrics(self.arrival_time, self.first_token_time, self.finished_time),
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
        )


class RequestHandle:
    """What generate_async returns: wait with result() / await aresult(), stream with `async for`.

    With streaming=True, `async for` yields a RequestOutput after every engine step that added
    tokens (``outputs[0].text_diff`` / ``token_ids_diff`` hold the new part); without it, only the
    final output. ``abort()`` cancels the request (finish_reason "cancelled").
    """

    def __init__(self, request_id: int, streaming: bool, engine):
        self.request_id = request_id
        self.streaming = streaming
        self._engine = engine
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._outputs: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._listener = None  # a GroupHandle's callback (output, error), set before the request runs

    # -- engine side ------------------------------------------------------------------------
    def _publish(self, output: RequestOutput | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if output is not None:
                self._outputs.append(output)
            if error is not None:
                self._error = error
            if error is not None or (output is not None and output.finished):
                self._done.set()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that event loop is closed
                pass
        if self._listener is not None:
            self._listener(output, error)

    # -- caller side ------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _final(self) -> RequestOutput:
        if self._error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {self._error!r}") from self._error
        return self._outputs[-1]

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._final()

    async def aresult(self) -> RequestOutput:
        async for _ in self._updates(final_only=True):
            pass
        return self._final()

    def __aiter__(self):
        return self._updates(final_only=not self.streaming)

    async def _updates(self, final_only: bool):
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        with self._lock:
            self._waiters.append((loop, ev))
        i = 0
        try:
            while True:
                with self._lock:
                    outs, done, err = list(self._outputs), self._done.is_set(), self._error
                if err is not None:
                    self._final()
                if final_only:
                    if done:
                        yield outs[-1]
                        return
                else:
                    for o in outs[i:]:
                        yield o
                    i = len(outs)
                    if done:
                        return
                await ev.wait()
                ev.clear()
        finally:
            with self._lock:
                self._waiters.remove((loop, ev))

    def abort(self) -> None:
        self._engine.abort(self.request_id)


class GroupHandle(RequestHandle):
    """The handle of a request with n > 1 or best_of > 1.

    Its best_of sequences run as separate engine requests (the prompt's full KV blocks are shared
    through the prefix cache); their snapshots merge here into one RequestOutput whose outputs are
    the sequences by index, or, once all are finished and best_of > n, the n with the highest
    cumulative logprob (best first). While streaming, a merged snapshot carries the new text only
    for the sequence that advanced.
    """

    def __init__(self, request_id: int, streaming: bool, n: int, num_sequences: int):
        super().__init__(request_id, streaming, engine=None)
        self._n = n
        self._children: list[RequestHandle] = []  # filled by the LLM as it submits the sequences
        self._latest: list[RequestOutput | None] = [None] * num_sequences
        self._merge_lock = threading.Lock()

    def listener(self, i: int):
        """The callback sequence i's handle calls with each of its outputs (or its error)."""
        return lambda output, error: self._child_update(i, output, error)

    def _child_update(self, i: int, output: RequestOutput | None, error: BaseException | None) -> None:
        with self._merge_lock:
            if self._done.is_set():
                return
            if error is not None:
                self._publish(error=error)
                return
            self._latest[i] = output
            self._publish(self._merge(i))

    def _merge(self, updated: int) -> RequestOutput:
        present = [(j, o) for j, o in enumerate(self._latest) if o is not None]
        outs = []
        for j, o in present:
            c = dataclasses.replace(o.outputs[0], index=j)
            if j != updated:
                c = dataclasses.replace(c, text_diff="", token_ids_diff=[])
            outs.append(c)
        finished = len(present) == len(self._latest) and all(o.finished for _, o in present)
        if finished and len(self._latest) > self._n:
            outs = sorted(outs, key=lambda c: c.cumulative_logprob, reverse=True)[: self._n]
        first = present[0][1]
        ms = [o.metrics for _, o in present if o.metrics is not None]
        firsts = [m.first_token_time for m in ms if m.first_token_time is not None]
        metrics = RequestMetrics(
            min(m.arrival_time for m in ms), min(firsts) if firsts else None,
            max(m.finished_time for m in ms) if finished else None,
        ) if ms else None
        return RequestOutput(self.request_id, first.prompt, first.prompt_token_ids, outs, finished, metrics)

    def abort(self) -> None:
        for child in self._children:
            child.abort()
