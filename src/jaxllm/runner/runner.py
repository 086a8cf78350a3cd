"""The model runner: padded device arrays in, tokens out, through two jitted pure functions.

* ``prefill``: one chunk of tokens per row (a whole prompt, a piece of a long prompt, or the part
  of a prompt past a reused prefix) at given positions; writes their K/V into the paged pool and
  samples each row's next token (the engine keeps it only for rows whose prompt is complete).
* ``decode``: up to ``steps`` decode steps in one device call (a ``while_loop``): sampling,
  EOS / stop-token and max_tokens checks all stay on device, and the loop ends early once every
  row is done. The host sees tokens once per call, not once per token.

Both are pure (parameters, pool and per-row state in; new pool and state out) and donate the pool,
so XLA updates it in place. The runner holds the pool between calls. Shapes come from a few
buckets (powers of two) so a handful of compilations serve every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models import ModelConfig
from ..sampling import (BadWordsState, PenaltyState, SamplingArrays, advance_rows, forbid_stops_before_min, sample,
                        token_info)
from ..sharding import tensor_parallel_for, tensor_parallel_size
from .multihost import Mirror, local_tree, spans_processes
from .paged import (
    ATTENTION_BACKENDS,
    decode_kernel_for,
    fused_rope_kv_wanted,
    init_pool,
    is_fp8,
    make_attend,
    pallas_decode_supported,
    pool_sharding,
    prefill_kernel_for,
    rope_kv_kernel_for,
    slots_for,
)


@contextlib.contextmanager
def explained_oom():
    """Device out-of-memory errors of a step program (compiling it -- XLA's GEMM autotuning takes
    scratch memory -- or running it) re-raised with what to change: the KV pool takes
    KvCacheConfig.free_gpu_memory_fraction of the memory the weights leave, and the rest is all a
    step's activations and the compiler have (BENCHMARKS.md "Twelfth session": fp8-w8a8 at 1024
    rows and 8192-token prefill calls ran out at 0.9 on an H100 while autotuning, and ran at 0.7)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise MemoryError(
            "the device ran out of memory compiling or running a step program; leave it more room: a lower "
            "KvCacheConfig(free_gpu_memory_fraction=...) (default 0.9; jaxllm bench: "
            "--kv-cache-free-gpu-memory-fraction), or a smaller max_num_tokens / max_batch_size. XLA said: "
            + str(e).splitlines()[0][:300]
        ) from e


@jax.tree_util.register_dataclass
@dataclass
class RowState:
    """Per-row decoding state, [B] each unless noted."""

    tokens: jax.Array  # last token: the next step's input
    positions: jax.Array  # position of `tokens`
    num_generated: jax.Array
    max_tokens: jax.Array
    min_tokens: jax.Array
    stop_ids: jax.Array  # [B, K] ids that end the row (EOS and stop_token_ids); vocab_size = padding
    done: jax.Array  # bool
    sampling: SamplingArrays
    penalty: PenaltyState | None = None  # only when a request in the batch uses penalties
    bad_words: BadWordsState | None = None  # only when a request in the batch bans tokens


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= n (and >= minimum), capped at maximum."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum) if maximum is not None else b


# decode calls of at most this many rows run a fixed loop by default on GPUs (JAXLLM_DECODE_LOOP=auto;
# measured on one H100 with the engine chaining such calls, BENCHMARKS.md "Fifteenth session": batch 1
# 3.87 -> 3.62 ms, 64 rows +3.9% and 256 rows +4.8% output tok/s; at 1024 rows -1.4%, where the
# dispatch waited for the device anyway and the while loop's early end of a call saved more)
FIXED_LOOP_MAX_ROWS = 256


def fixed_loop_max_rows() -> int:
    """JAXLLM_FIXED_LOOP_MAX_ROWS (A/B runs; default FIXED_LOOP_MAX_ROWS): the most rows a decode
    call may have to run a fixed loop under JAXLLM_DECODE_LOOP=auto; 0: none does."""
    value = os.environ.get("JAXLLM_FIXED_LOOP_MAX_ROWS", str(FIXED_LOOP_MAX_ROWS))
    if not value.isdigit():
        raise ValueError(f"JAXLLM_FIXED_LOOP_MAX_ROWS={value!r}: expected a whole number of rows (0 or more)")
    return int(value)


def decode_loop_mode() -> int | None | str:
    """JAXLLM_DECODE_LOOP: how often a decode call checks whether every row is done, as the number
    of steps between checks (None: never, the call runs all its steps). "while" (1) checks each step
    and ends the call early -- but XLA:GPU copies the loop predicate to the host each time, so the
    dispatch waits for the loop and the host then launches each step (its command buffers, and
    under tensor parallelism each collective) from behind; "fixed" (None) runs the call's `steps`
    steps as a loop of known trip count, so the host can enqueue them all ahead (done rows are
    masked: no tokens, no KV writes), the engine may chain the calls (Engine.overlap_decode), and
    under tensor parallelism on GPUs its programs record the collectives into the command buffers
    (decode_compiler_options); a power of two N checks every N steps (an inner loop of N steps,
    known trip count). "auto" (the default): fixed for decode calls of at most FIXED_LOOP_MAX_ROWS
    rows on GPUs, while otherwise and for a call whose every row ends within it by its max_tokens
    (ModelRunner.decode_check_every). (A fixed loop whose steps after every row is done were
    skipped by a ``lax.cond`` failed on 2x H200: XLA could not trace the conditional's command
    buffer around NCCL, BENCHMARKS.md "Eleventh session"; removed.)"""
    mode = os.environ.get("JAXLLM_DECODE_LOOP", "auto")
    if mode == "auto":
        return mode
    if mode == "while":
        return 1
    if mode == "fixed":
        return None
    if not (mode.isdigit() and int(mode) > 0 and int(mode) & (int(mode) - 1) == 0):
        raise ValueError(f"JAXLLM_DECODE_LOOP={mode!r}: expected auto, while, fixed or a power of two "
                         f"(steps between checks)")
    return int(mode)


# XLA:GPU's command buffer kinds by default (jaxlib 0.11's, as its dumped debug options list them)
# and the collectives: a fixed decode loop's programs record their all-reduces into the command
# buffers (one graph per step instead of one per stretch between all-reduces)
DECODE_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,DYNAMIC_SLICE_FUSION,CONDITIONAL,COLLECTIVES"


def decode_compiler_options(check_every: int | None, tensor_parallel, mesh) -> dict | None:
    """XLA options of the decode programs alone: with a fixed decode loop (JAXLLM_DECODE_LOOP=fixed)
    over the collectives of a TensorParallel on GPUs, collectives in command buffers. (Measured
    process-wide on 2x H200, tp=2 batch 1: 3.78-3.82 -> 3.67-3.69 ms with the fixed loop, but TTFT
    ~10.5 -> ~13.3 ms, the prefill programs' graphs re-recorded each call: so decode only here,
    BENCHMARKS.md "Tenth session".) None where nothing changes, or where the user's XLA_FLAGS
    already choose the command buffer kinds."""
    if check_every is not None or tensor_parallel is None or mesh.devices.flat[0].platform != "gpu":
        return None
    if "--xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_gpu_enable_command_buffer": DECODE_COMMAND_BUFFERS}


class ModelRunner:
    def __init__(
        self,
        model: nnx.Module,
        cfg: ModelConfig,
        dtype,
        num_blocks: int,
        block_size: int,
        mesh,
        kv_dtype=None,
        attention_backend: str = "auto",
        kv_scales=None,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.kv_scales = self._check_kv_scales(kv_scales)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tp = tensor_parallel_size(mesh)
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.attention_backend = self._choose_backend(attention_backend, mesh)
        self._mirror = Mirror() if spans_processes(mesh) else None
        use_pallas = self.attention_backend == "pallas"
        self._decode_kernel = decode_kernel_for(block_size, cfg.sliding_window, mesh) if use_pallas else None
        # decode's q/k/v epilogue (sums, scales, RoPE, KV writes) as one kernel
        self._rope_kv = rope_kv_kernel_for() if use_pallas and fused_rope_kv_wanted(mesh) else None
        # chunked / prefix-cached prefill: the Pallas ragged prefill kernel (head dims up to 256)
        self._prefill_kernel = (
            prefill_kernel_for(block_size, cfg.sliding_window, mesh)
            if use_pallas and cfg.head_dim <= 256 else None
        )
        # whole-prompt prefill attention: cuDNN's flash attention beside the Pallas decode kernel
        self._fresh_impl = "cudnn" if use_pallas and self.tp == 1 else None
        # the collectives the step writes itself under tensor parallelism (None on one device)
        self._tensor_parallel = tensor_parallel_for(mesh)
        self._loop_mode = decode_loop_mode()
        self._on_gpu = mesh.devices.flat[0].platform == "gpu"
        self._fixed_max_rows = fixed_loop_max_rows()
        # Placed on the mesh from the start, like every pool the step functions return: a first pool
        # with another sharding would make each step shape compile twice.
        self.pool = jax.jit(
            lambda: init_pool(cfg, num_blocks, block_size, self.kv_dtype, self.tp), out_shardings=pool_sharding(cfg, mesh)
        )()
        self._prefill = jax.jit(
            self._prefill_impl, static_argnames=("num_logprobs", "all_greedy", "prompt_logprobs", "fresh"),
            donate_argnames=("pool",),
        )
        self._last_logits = jax.jit(self._last_logits_impl)
        # one jitted decode per loop kind (their compiler options differ), made when first used
        self._decodes: dict[int | None, Callable] = {}

    @property
    def prefill_reads_own_pages(self) -> bool:
        """Whether chunked / prefix-cached prefill runs the Pallas kernel, whose cost does not grow
        with the block table's width (the jnp reference gathers every page of it)."""
        return self._prefill_kernel is not None

    def _check_kv_scales(self, kv_scales):
        """Per layer (k_scale, v_scale) of an fp8 pool as static floats (compiled in: the K scale
        folds into the softmax scale); default 1.0 each, as vLLM without calibrated scales."""
        n = self.cfg.num_layers
        if kv_scales is None:
            return ((1.0, 1.0),) * n
        scales = tuple((float(k), float(v)) for k, v in kv_scales)
        if len(scales) != n or not all(0 < x < float("inf") for pair in scales for x in pair):
            raise ValueError(f"kv_scales must be {n} pairs (k_scale, v_scale) of positive finite floats, got {kv_scales!r}")
        if not is_fp8(self.kv_dtype) and any(pair != (1.0, 1.0) for pair in scales):
            raise ValueError(f"kv_scales apply to fp8 KV pools only; this pool is {jnp.dtype(self.kv_dtype).name}")
        return scales

    def _choose_backend(self, requested: str, mesh) -> str:
        """"auto" and "pallas": the Pallas kernels where they run (NVIDIA GPU, bf16/fp16/fp8 KV, KV
        heads split over the devices): decode, chunked / prefix-cached prefill, and whole fresh
        prompts under tensor parallelism (cuDNN on one device); else the jnp reference. An explicit
        "pallas" where they cannot run is an error."""
        if requested not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {requested!r}")
        why_not = pallas_decode_supported(self.cfg, self.kv_dtype, mesh, self.block_size)
        if requested == "pallas" and why_not:
            raise ValueError(f"attention_backend='pallas' is not available: {why_not}")
        if requested == "auto":
            return "reference" if why_not else "pallas"
        return requested

    # -- pure functions (traced) -------------------------------------------------------------
    def _forward(self, params, pool, tokens, positions, valid, block_tables, fresh=False):
        model = nnx.merge(self.graphdef, params)
        slots = slots_for(positions, block_tables, self.block_size, valid)
        attend = make_attend(
            positions, slots, block_tables, self.block_size, self.cfg.sliding_window, self._decode_kernel,
            self._fresh_impl if fresh else None, self.kv_scales, prefill_kernel=self._prefill_kernel,
            padding_page=True, tensor_parallel=self._tensor_parallel, rope_kv=self._rope_kv,
        )
        hidden, pool = model(tokens, positions, pool, attend)
        return model, hidden, pool

    def _advance(self, state: RowState, logits, num_logprobs, all_greedy=False):
        """Sample the next token of every row from logits [B, V] and update stop bookkeeping.

        Returns (state, tokens [B] (-1 for rows already done), token_info dict of [B, ...] arrays).
        """
        if state.penalty is not None:
            logits = state.penalty.apply(logits.astype(jnp.float32))
        if state.bad_words is not None:
            logits = state.bad_words.apply(logits.astype(jnp.float32))
        logits = forbid_stops_before_min(logits, state.stop_ids, state.num_generated, state.min_tokens)
        next_pos = state.positions + 1
        tok, logprobs = sample(logits, state.sampling, next_pos, all_greedy)
        active = ~state.done
        out, tokens, positions, num, done = advance_rows(tok, state.stop_ids, state.tokens, state.positions,
                                                         state.num_generated, state.max_tokens, state.done)
        new = dataclasses.replace(
            state,
            tokens=tokens,
            positions=positions,
            num_generated=num,
            done=done,
            penalty=state.penalty.update(tok, active) if state.penalty is not None else None,
            bad_words=state.bad_words.update(tok, active) if state.bad_words is not None else None,
        )
        return new, out, token_info(logprobs, tok, num_logprobs)

    def _prefill_impl(
        self, params, pool, tokens, positions, valid, block_tables, last_idx, state: RowState, num_logprobs,
        all_greedy, targets=None, prompt_logprobs=None, fresh=False,
    ):
        model, hidden, pool = self._forward(params, pool, tokens, positions, valid, block_tables, fresh)
        prompt_info = None
        if prompt_logprobs is not None:  # logprobs of targets [B, T] (the next prompt tokens) at every position
            b, t = targets.shape
            lps = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1).reshape(b * t, -1)
            info = token_info(lps, jnp.maximum(targets, 0).reshape(-1), max(prompt_logprobs, 1))
            prompt_info = jax.tree.map(lambda x: x.reshape((b, t) + x.shape[1:]), info)
        last = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)[:, 0]
        last_pos = jnp.take_along_axis(positions, last_idx[:, None], axis=1)[:, 0]
        state = dataclasses.replace(state, positions=last_pos)
        state, tok, info = self._advance(state, model.logits(last), num_logprobs, all_greedy)
        return pool, tok, info, prompt_info, state

    def _decode_impl(self, params, pool, block_tables, state: RowState, steps: int, num_logprobs, all_greedy,
                     check_every: int | None):
        b = state.tokens.shape[0]
        out = jnp.full((b, steps), -1, jnp.int32)
        # per-step token info, [B, steps, ...] (shapes from one traced step)
        info_shapes = jax.eval_shape(lambda: self._advance(state, jnp.zeros((b, self.cfg.vocab_size)), num_logprobs)[2])
        out_lp = jax.tree.map(lambda x: jnp.zeros((b, steps) + x.shape[1:], x.dtype), info_shapes)

        def cond(carry):
            i, _, st, _, _ = carry
            return (i < steps) & ~jnp.all(st.done)

        def body(carry):
            i, pool, st, out, out_lp = carry
            pos = st.positions[:, None]
            model, hidden, pool = self._forward(params, pool, st.tokens[:, None], pos, ~st.done[:, None], block_tables)
            st, tok, info = self._advance(st, model.logits(hidden[:, 0]), num_logprobs, all_greedy)
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
            out_lp = jax.tree.map(
                lambda o, x: jax.lax.dynamic_update_slice(o, x[:, None], (0, i) + (0,) * (x.ndim - 1)), out_lp, info
            )
            return i + 1, pool, st, out, out_lp

        def run(n):  # n steps of known trip count (done rows are masked: no KV writes, no tokens)
            return lambda carry: jax.lax.fori_loop(0, n, lambda _, c: body(c), carry)

        carry = (jnp.int32(0), pool, state, out, out_lp)
        if check_every is None:  # a fixed loop (decode_loop_mode)
            carry = run(steps)(carry)
        else:  # ends early once every row is done, checked every `every` steps (a divisor of `steps`);
            # XLA:GPU reads a while loop's predicate on the host
            every = math.gcd(steps, check_every)
            carry = jax.lax.while_loop(cond, body if every == 1 else run(every), carry)
        _, pool, state, out, out_lp = carry
        return pool, state, out, out_lp

    # -- host-facing API ---------------------------------------------------------------------
    def prefill(
        self, tokens, positions, valid, block_tables, last_idx, state: RowState, num_logprobs=None, all_greedy=False,
        targets=None, prompt_logprobs=None, fresh=False,
    ):
        """Run one chunk per row (`fresh`: every row starts at position 0); returns (next token [B],
        its token_info, and with prompt_logprobs (static K) the token_info of `targets` [B, T] at
        every position, else None; the rows' state after that token: where a row's prompt ends in
        this chunk, what its first decode call may start from) as device arrays."""
        return self.call(*self.prefill_call(tokens, positions, valid, block_tables, last_idx, state, num_logprobs,
                                            all_greedy, targets, prompt_logprobs, fresh))

    def decode(self, block_tables, state: RowState, steps: int, num_logprobs=None, all_greedy=False, tail=False):
        """Run up to `steps` decode steps; returns (state, tokens [B, steps] (-1: none), token_info
        with [B, steps, ...] arrays). `tail`: every row ends within the call by its max_tokens (see
        decode_check_every)."""
        return self.call(*self.decode_call(block_tables, state, steps, num_logprobs, all_greedy, tail))

    # A call is (kind, static arguments, array arguments): what `prefill` / `decode` run, as data,
    # so that it can also be compiled ahead (`compile_ahead`) or announced to other processes.
    def prefill_call(self, tokens, positions, valid, block_tables, last_idx, state: RowState, num_logprobs=None,
                     all_greedy=False, targets=None, prompt_logprobs=None, fresh=False) -> tuple:
        statics = dict(num_logprobs=num_logprobs, all_greedy=all_greedy, prompt_logprobs=prompt_logprobs,
                       fresh=bool(fresh and self._fresh_impl is not None))
        return "prefill", statics, (tokens, positions, valid, block_tables, last_idx, state, targets)

    def decode_call(self, block_tables, state: RowState, steps: int, num_logprobs=None, all_greedy=False,
                    tail=False) -> tuple:
        every = self.decode_check_every(state.tokens.shape[0], tail)
        return "decode", dict(steps=steps, num_logprobs=num_logprobs, all_greedy=all_greedy, check_every=every), (
            block_tables, state)

    def call(self, kind: str, statics: dict, args: tuple):
        return self._run(kind, statics, self._announce(kind, statics, args))

    def compile_ahead(self, calls: list[tuple], workers: int | None = None) -> None:
        """Compile the programs of `calls` on several threads at once (XLA compiles outside the
        GIL); with the persistent compilation cache on, making the calls afterwards only loads
        them. Nothing runs on the device here."""
        from concurrent.futures import ThreadPoolExecutor

        def compile_one(c):
            fn, args, kwargs = self._jit_call(*c)
            with explained_oom():
                fn.lower(*args, **kwargs).compile()

        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as ex:
            list(ex.map(compile_one, calls))

    def _jit_call(self, kind: str, statics: dict, args: tuple):
        """(jitted function, positional args, keyword args) that make a call on the current pool."""
        if kind == "prefill":
            return self._prefill, (self.params, self.pool, *args[:6]), dict(targets=args[6], **statics)
        statics = dict(statics)
        return self._decode_for(statics.pop("check_every")), (self.params, self.pool, *args), statics

    def decode_check_every(self, rows: int, tail: bool = False) -> int | None:
        """How often a decode call of `rows` rows checks whether every row is done (decode_loop_mode):
        None (a fixed loop) or a number of steps. JAXLLM_DECODE_LOOP=auto: a fixed loop for at most
        FIXED_LOOP_MAX_ROWS rows (JAXLLM_FIXED_LOOP_MAX_ROWS) on GPUs, where the dispatch of a while
        loop waits for it (XLA:GPU reads its predicate on the host) -- but each step for a `tail`
        call, whose every row ends within it by its max_tokens (a fixed loop would run on past
        them: the while loop returns their last tokens as soon as they are made); elsewhere each
        step (a CPU's while loop costs nothing)."""
        if self._loop_mode != "auto":
            return self._loop_mode
        return None if self._on_gpu and rows <= self._fixed_max_rows and not tail else 1

    def _decode_for(self, every: int | None) -> Callable:
        """The jitted decode program of a loop kind (decode_check_every), made when first used."""
        if every not in self._decodes:
            self._decodes[every] = jax.jit(
                functools.partial(self._decode_impl, check_every=every),
                static_argnames=("steps", "num_logprobs", "all_greedy"), donate_argnames=("pool",),
                compiler_options=decode_compiler_options(every, self._tensor_parallel, self.mesh),
            )
        return self._decodes[every]

    def _run(self, kind: str, statics: dict, args: tuple):
        fn, fn_args, kwargs = self._jit_call(kind, statics, args)
        with explained_oom():
            self.pool, *out = fn(*fn_args, **kwargs)
        return local_tree(tuple(out)) if self._mirror is not None else tuple(out)

    # -- several hosts: process 0 announces each call, the others make it too ----------------
    @staticmethod
    def _structure(kind: str, flags: dict):
        """The pytree structure of a call's inputs, from its flags (for the other processes)."""
        z = 0
        state = RowState(z, z, z, z, z, z, z, SamplingArrays(*(z,) * 6),
                         penalty=PenaltyState(*(z,) * 5) if flags["penalty"] else None,
                         bad_words=BadWordsState(*(z,) * 4) if flags["bad_words"] else None)
        if kind == "prefill":
            return jax.tree.structure((z, z, z, z, z, state, z if flags["targets"] else None))
        return jax.tree.structure((z, state))

    def _announce(self, kind: str, statics: dict, args: tuple) -> tuple:
        if self._mirror is None:
            return args
        state = args[1] if kind == "decode" else args[5]
        flags = dict(penalty=state.penalty is not None, bad_words=state.bad_words is not None,
                     targets=kind == "prefill" and args[6] is not None)
        leaves = self._mirror.lead(kind, statics, flags, jax.tree.leaves(args))
        return jax.tree.unflatten(self._structure(kind, flags), leaves)

    def follow(self) -> None:
        """Processes other than 0: make every device call process 0 announces, until it stops."""
        while True:
            kind, statics, flags, leaves = self._mirror.wait()
            if kind == "stop":
                return
            self._run(kind, statics, jax.tree.unflatten(self._structure(kind, flags), leaves))

    def _scratch_forward(self, params, tokens):
        """The model over prompts [B, T] from position 0, with a scratch pool of its own (the
        serving pool is untouched): (model, final hidden states)."""
        b, t = tokens.shape
        nb = -(-t // self.block_size)
        tables = jnp.arange(b * nb, dtype=jnp.int32).reshape(b, nb)
        pool = init_pool(self.cfg, b * nb, self.block_size, self.kv_dtype, self.tp)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        model, hidden, _ = self._forward(params, pool, tokens, positions, jnp.ones((b, t), bool), tables)
        return model, hidden

    def hidden_states(self, tokens):
        """Final hidden states and float32 logits for prompts [B, T] from position 0 (tests, scoring)."""
        model, hidden = self._scratch_forward(self.params, tokens)
        return hidden, model.logits(hidden)

    def last_logits(self, seqs: list[list[int]]) -> np.ndarray:
        """float32 logits [len(seqs), vocab] for the token after each sequence, computed from
        scratch (the slower paths: beam search, logits processors). Lengths are padded to
        power-of-two buckets, so one compilation serves many steps."""
        if self._mirror is not None:
            raise NotImplementedError("beam search and logits processors do not run on several hosts yet")
        toks = np.zeros((len(seqs), bucket(max(len(s) for s in seqs), 16)), np.int32)
        for i, s in enumerate(seqs):
            toks[i, : len(s)] = s
        last = np.array([len(s) - 1 for s in seqs], np.int32)
        return np.array(self._last_logits(self.params, jnp.asarray(toks), jnp.asarray(last)), np.float32)  # writable

    def _last_logits_impl(self, params, tokens, last):
        model, hidden = self._scratch_forward(params, tokens)
        at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return model.logits(at_last).astype(jnp.float32)

    def release(self) -> None:
        """Free the device memory of the parameters and the pool (on several hosts, process 0
        first tells the others to stop following)."""
        if self._mirror is not None and self._mirror.is_leader and self.pool is not None:
            self._mirror.lead("stop", {}, {}, [])
        for leaf in jax.tree.leaves((self.params, self.pool)):
            if hasattr(leaf, "delete"):
                leaf.delete()
        self.pool = None

