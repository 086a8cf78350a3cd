"""First-come-first-served continuous batching with chunked prefill and preemption by recompute.

Each engine step the scheduler decides, on the host and without touching the device:

1. For every running request, oldest admission first, its work this step: a **decode** run of up
   to ``decode_steps`` tokens, or the next **prefill chunk** of its prompt within the step's token
   budget (``max_num_tokens``). A prefill call is padded to (row bucket) x (chunk-length bucket)
   positions, and that padded shape stays within ``max_num_tokens`` too: a chunk that would widen
   it past the budget waits for the next step (the first chunk of a step always fits). Blocks for
   that work are allocated now. When the pool is short, the most recently admitted running
   request is **preempted**: its blocks are freed (they stay in the prefix cache) and it goes back
   to the head of the waiting queue, to be recomputed from its prompt plus what it has generated
   so far. The oldest request can therefore always progress,
   and nothing is lost or generated twice.
2. Unless step 1 preempted, waiting requests are admitted in arrival order while batch slots,
   budget and blocks last (reusing cached prefix blocks); admission never preempts.
3. Prefill first: while requests are still waiting for a free slot after this step's admissions,
   the step runs its prefill chunks only and the decode rows wait (as vLLM's prefill-priority
   scheduling); they decode once the batch is full or nobody waits, or after
   ``max_prefill_streak`` such steps in a row.

A request whose prompt's last chunk is in a prefill call still on the device (the engine collects a
prefill-only step's call after dispatching the next step's: ``Engine._step``) has its KV counted as
computed but not yet its next token; the scheduler leaves it out until that token arrives, and
``join_decode`` then adds it to the decode rows of the plan made meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..runner import bucket
from .block_manager import BlockManager
from .request import Request, Status


def prefill_length_cap(rows: int, max_num_tokens: int) -> int:
    """The longest chunk-length bucket a prefill call of `rows` rows (a row bucket) may have: its
    padded shape rows x length stays within max_num_tokens, except that the shortest bucket (16)
    is always allowed, so short chunks batch even under a tiny budget."""
    if rows == 1:
        return max_num_tokens
    cap = max_num_tokens // rows
    return max(16, 1 << (cap.bit_length() - 1) if cap else 0)  # chunk-length buckets are powers of two


@dataclass
class Plan:
    prefill: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, start, end) of all_ids
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    decode_deferred: bool = False  # decode rows held back this step (prefill first)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    # Prefill-first steps in a row before the decode rows run anyway: bounds their stall to this
    # many prefill calls (each at most max_num_tokens positions).
    max_prefill_streak = 32

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int, decode_steps: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.decode_steps = decode_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens whose KV came from the prefix cache, cumulative
        self.num_deferred_decodes = 0  # decode rows held back by prefill-first steps, cumulative
        self._prefill_streak = 0  # prefill-first steps since the last decode
        self._admissions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------
    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's blocks cover num_tokens KV slots; False if the pool is short."""
        need = self.blocks.blocks_needed(num_tokens) - len(req.blocks)
        if need <= 0:
            return True
        new = self.blocks.allocate(need)
        if new is None:
            return False
        req.blocks += new
        return True

    def _preempt(self, req: Request, plan: Plan) -> None:
        self.running.remove(req)
        self.blocks.release(req.blocks)
        req.reset_kv()
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        plan.preempted.append(req)

    def _prefill_room(self, plan: Plan) -> int:
        """The longest chunk one more prefill row may have this step (0: none fits). The call is
        padded to (row bucket) x (chunk-length bucket) positions, which must stay within
        max_num_tokens (see `prefill_length_cap`): one long chunk beside many short ones would
        otherwise compute (and hold activations for) rows x long positions -- 128 x 1024 at 70B
        overflowed an H200."""
        rows = bucket(len(plan.prefill) + 1, 1, self.max_batch_size)
        if rows == 1:
            return self.max_num_tokens
        fit = prefill_length_cap(rows, self.max_num_tokens)
        longest = max((end - start for _, start, end in plan.prefill), default=0)
        return fit if bucket(longest, 16, self.max_num_tokens) <= fit else 0

    def _reserve(self, req: Request, num_tokens: int, plan: Plan) -> bool:
        """Allocate for req, preempting the newest running requests as needed; False if req itself went."""
        while not self._grow(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return False
        return True

    def release(self, req: Request) -> None:
        """A finished or aborted request gives back its blocks and its slot."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req.blocks)
        req.blocks = []
        req.status = Status.FINISHED  # for the scheduler (its output may still await its text)

    def schedule(self) -> Plan:
        plan = Plan()
        budget = self.max_num_tokens
        for req in list(self.running):
            if req.status is not Status.RUNNING:  # preempted earlier in this loop (O(1): not a list search)
                continue
            remaining = len(req.all_ids) - req.num_computed
            if remaining == 0:  # its next token comes from a prefill call still in flight
                continue
            if remaining == 1:  # decode phase: only the last sampled token lacks KV
                want = min(req.num_computed + self.decode_steps, req.max_kv_tokens)
                if self._reserve(req, want, plan):
                    plan.decode.append(req)
            elif budget > 0 and (room := self._prefill_room(plan)):
                chunk = min(remaining, budget, room)
                if self._reserve(req, req.num_computed + chunk, plan):
                    plan.prefill.append((req, req.num_computed, req.num_computed + chunk))
                    budget -= chunk
        # No admission in a step that had to preempt: the pool is short, and the preempted request
        # would only be re-admitted at once.
        while not plan.preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            room = self._prefill_room(plan)
            if not room:
                break
            req = self.waiting[0]
            # a request still owed prompt logprobs computes its whole prompt
            cached = [] if req.needs_prompt_logprobs else self.blocks.match_prefix(req.all_ids)
            self.blocks.take(cached)
            req.blocks = list(cached)
            req.num_computed = len(cached) * self.blocks.block_size
            chunk = min(len(req.all_ids) - req.num_computed, budget, room)
            if not self._grow(req, req.num_computed + chunk):
                self.blocks.release(req.blocks)
                req.reset_kv()
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.admitted_seq = self._admissions
            self._admissions += 1
            self.running.append(req)
            self.prefix_hit_tokens += req.num_computed
            plan.prefill.append((req, req.num_computed, req.num_computed + chunk))
            budget -= chunk
        self._settle_decode(plan)
        return plan

    def _settle_decode(self, plan: Plan) -> None:
        """Whether the plan's decode rows run this step or wait (prefill first)."""
        deferrable = plan.decode and plan.prefill and self.waiting and len(self.running) < self.max_batch_size
        if deferrable and not plan.preempted and self._prefill_streak < self.max_prefill_streak:
            # Prefill first: requests still wait for free slots, so this step only prefills and the
            # running requests decode (with their blocks already reserved) once admission stops.
            # Otherwise every admission step would also run a whole decode call (decode_steps
            # tokens for the running rows) and the batch would fill decode_steps times slower.
            # At most max_prefill_streak such steps in a row: the decode rows always progress.
            self._prefill_streak += 1
            self.num_deferred_decodes += len(plan.decode)
            plan.decode = []
            plan.decode_deferred = True
        elif plan.decode:
            self._prefill_streak = 0

    def continue_decode(self, rows: list[Request], ahead: int | None = None) -> bool:
        """Whether `rows` -- whose last decode call is still in flight, its tokens not yet received --
        may have their next call now, without a schedule: nothing waits, they are every running
        request and each still decodes, and the call in flight leaves one of them short of its
        max_tokens. Those rows' blocks are grown, without preempting anyone, to cover both calls (KV
        counted as of the call before); False if the pool is short. `ahead`: the steps of the call in
        flight (default decode_steps)."""
        return self._may_chain(rows, 1, ahead or self.decode_steps, 2 * self.decode_steps)

    def decode_after_prefill(self, reqs: list[Request]) -> bool:
        """Whether `reqs` -- whose prompts a prefill call still in flight completes, their next tokens
        not yet received -- may have their first decode call now, chained onto that call: nothing
        waits, they are every running request, each has its whole prompt's KV counted, and one of
        them goes on past the token the prefill makes. Those rows' blocks are grown, without
        preempting anyone, to cover the call; False if the pool is short."""
        return self._may_chain(reqs, 0, 1, self.decode_steps)

    def _may_chain(self, rows: list[Request], lacking: int, ahead: int, cover: int) -> bool:
        """continue_decode / decode_after_prefill: nothing waits, `rows` are every running request, each
        running with `lacking` tokens of its own not yet in the KV, and the `ahead` tokens in flight
        leave one of them short of its max_tokens; those rows' blocks grow to `cover` KV slots past
        what is computed (capped by max_kv_tokens), without preempting anyone. False if any of it fails."""
        if self.waiting or len(self.running) != len(rows) or any(
                r.status is not Status.RUNNING or len(r.all_ids) - r.num_computed != lacking for r in rows):
            return False
        going_on = [r for r in rows if r.num_generated + ahead < r.params.max_tokens]
        return bool(going_on) and all(self._grow(r, min(r.num_computed + cover, r.max_kv_tokens)) for r in going_on)

    def join_decode(self, plan: Plan, reqs: list[Request]) -> None:
        """reqs got their next token after `plan` was made (from a prefill call then in flight, which
        `schedule` left them out for): they join its decode rows, in admission order, as `schedule`
        would have placed them -- unless the plan holds its decode rows back. Only where their blocks
        fit without preempting (the plan's calls may be on the device already); the others decode
        next step."""
        if plan.decode_deferred:
            return
        joining = [r for r in reqs if r.status is Status.RUNNING and len(r.all_ids) - r.num_computed == 1
                   and self._grow(r, min(r.num_computed + self.decode_steps, r.max_kv_tokens))]
        if not joining:
            return
        undecided = not plan.decode  # schedule settled nothing about an empty decode
        plan.decode = sorted(plan.decode + joining, key=lambda r: r.admitted_seq)
        if undecided:
            self._settle_decode(plan)
