"""Paged decode attention: one query token per sequence over its KV pages (Mosaic GPU kernel).

Layout (the engine's pool, see ``jaxllm.runner.paged``): K and V pools ``[num_slots, kv_heads,
head_dim]`` with slots grouped in pages of ``block_size``; a sequence's page ids are its row of
``block_tables``; ``lengths[b]`` tokens are valid (the current token included).

Why it is written this way
--------------------------
* Decode attention is memory-bound: each KV byte is used by ``G = heads / kv_heads`` query rows
  only. The kernel's job is to keep HBM busy, so the KV pages travel by TMA (the Hopper bulk copy
  engine) into a ring of ``max_concurrent_steps`` shared-memory stages, each completing on its own
  barrier, while the tensor cores work on an earlier stage. One program (one warpgroup) serves one
  (kv head, sequence, split): the G query rows of a KV head share every page read, so each page is
  read once per KV head, never once per query head.
* Mosaic GPU, not the Triton backend: the Triton backend is deprecated upstream; Mosaic GPU is
  Hopper-native (TMA, wgmma, explicit barriers) and can be checked on CPU with
  ``plgpu.InterpretGPUParams``.
* wgmma needs 64 rows, a decode step has G (1..8) query rows per KV head. The Q tile is the 64
  rows of the flattened ``[B*H, D]`` query starting at this group (TMA fills rows past the end
  with zeros); the rows beyond G belong to other heads and their results are never stored. The
  tensor cores have time to spare in a memory-bound kernel; what matters is that KV is read once.
* A step covers ``block_kv`` tokens (64 or 128): one TMA copy per page when pages are smaller
  (so 16-token pages still make full tiles), several copies per page when they are larger.
* Split-K: with few sequences (batch 1) and long contexts one program per (head, sequence) would
  leave most of the 132 SMs idle, so the pages of a sequence are split over ``num_splits``
  programs, each writing its normalized partial output and log-sum-exp; a tiny jnp epilogue merges
  them (the flash-decoding scheme).
* Masking is by token position (``< length``, inside the sliding window, inside this split), so
  table entries past a sequence's pages may hold any valid page id.
* Logit soft-cap (Gemma 2) and sliding window (Mistral) are applied on the scores in registers.
* FP8 pools (float8_e4m3fn, ``KvCacheConfig(dtype="fp8")``): the pages travel by TMA as fp8, so a
  step moves half the bytes of bf16 (the point: decode is bound by those bytes). wgmma cannot
  take them as they are: its fp8 form wants *both* operands in fp8, and Q and P in fp8 would
  lose far more than the cache's own rounding. So each stage is read from shared memory into
  registers, converted, and stored into one 16-bit staging tile per operand that the unchanged
  wgmma path reads. The conversion is to float16, not bfloat16: every e4m3 value is exact in
  float16, and Mosaic GPU's fp8 -> f16 ``cvt`` exists on every Hopper toolchain while fp8 -> bf16
  needs PTX ISA 9.2; so an fp8 kernel computes in float16 (Q, P, the staging tiles; accumulation
  stays float32). The scales are per tensor: the K scale folds into the softmax scale and the V
  scale into the output, so they cost nothing per element. The staging tiles are reused every
  step: the wgmma that read one has completed (its accumulator was read) before the next step
  overwrites it, and the conversion's stores are fenced for the tensor cores by ``commit_smem``.
* Several KV heads per program (``heads_per_program``, default 1): at a large batch of short
  contexts a (head, sequence) program runs 2-3 steps, so its fixed latency (Q load, filling the
  ring, the epilogue) is never hidden. A program may serve ``heads_per_program`` consecutive KV
  heads of one (sequence, split) instead: a single loop over ``t < heads_per_program * n_steps``
  (head ``t // n_steps``, step ``t % n_steps``) drives the ring, so ``fill_ring`` and
  ``refill_previous`` issue the next head's first pages while the last steps of the current one
  run -- one barrier wait per copy issued, exactly as with one head. The softmax state restarts at
  each head's first step; each head's rows and log-sum-exps are stored when its last step is done
  (after waiting for the previous head's stores to have read the output tiles). The query rows of
  consecutive KV heads are consecutive rows of the flattened query, so one 64-row Q tile serves
  all the program's heads where they fit (``heads_per_program * G`` rows from offset r0);
  otherwise each head's tile is loaded when the previous head finishes (after its last QK).
* Programs per SM (``lean_smem``, opt-in): one warpgroup runs a step's waits, conversions, wgmmas
  and softmax one after another, so an SM is only kept busy by several resident programs, and at
  block_kv 64 shared memory allows two (~104 KiB each). At 1024 sequences of 160 tokens the fp8
  kernel took as long as the bf16 one (256-270 vs 267-293 us on an H100, thirteenth session) for
  half the bytes, whatever heads_per_program: bound by latency, not bytes. ``lean_smem`` converts K
  and V into one staging tile (a warpgroup barrier before each conversion) and scopes P and the
  staging tile to the loop and O to the epilogue (``pl.run_scoped`` allocations are a stack, so the
  two scopes share their bytes): ~72 KiB, three programs per SM. Alone no faster on an H100.
* Swapped products (``swap_ab``; the engine's default, a kernel argument here): Q K^T with the G query rows padded to wgmma's 64-row M
  spends 64 / G times the tensor-core work a step needs (16x for Llama's G = 4): at 1024 x 160
  tokens that is ~52 GFLOP a call, ~50 us of an H100's dense f16 peak, several times that at the
  small, waited-for wgmmas of a decode step. Transposed, S^T = K Q^T [tile, N] and O^T = V^T P^T
  [d, N] put the query rows on the wgmma's N, a multiple of 8 (N = 8 for G = 4): an eighth of the
  work, accumulators of 4 + 8 registers a thread instead of 32 + 64, and Q, P and O tiles of 8 rows
  (fp8, block_kv 64, two stages: ~70 KiB a program, ~54 KiB with ``lean_smem``). The softmax then
  reduces over the tile's rows (across the warpgroup's warps), P is stored transposed for the
  second wgmma's B, V is read transposed as its A (16-bit: wgmma takes an MN-major A from shared
  memory), and O is stored transposed into its tile before the same row-slice copy out.
  Measured on an H100 (fp8, 1024 x 160): 194 vs 272 us a call; ``lean_smem`` with it 183 us, but
  no gain in the model (BENCHMARKS.md, fourteenth session).
* Page ids ahead of their copies: a tile's page ids are global loads (the block table stays in
  HBM), ~0.5 us each, that a TMA copy issued between them would serialize (its side effects keep
  the next load behind it). So a tile's ids are read together (``tile_pages``), and the ring's
  refills take ids read one step earlier (``prefetch_pages``, on by default; off: read at the
  refill), so their latency hides behind a step of work. Not yet timed on a GPU.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
ROWS = 64  # wgmma M


FP8 = jnp.dtype(jnp.float8_e4m3fn)
KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), FP8)
F16_MAX = 65504.0


# -- pieces both attention kernels (decode here, prefill in prefill_attention.py) share -------------
def tensor_core_q(q, scale, k_scale, dtype):
    """(q as the tensor cores read it, the softmax scale): a constant K scale folds into the softmax
    scale, a traced one into q; f16 (the fp8 pools' compute type) is clipped to its range."""
    q_in = q
    if isinstance(k_scale, (int, float)):
        scale = scale * k_scale
    else:  # a traced scale cannot be a constant of the kernel: scale q instead
        q_in = q.astype(jnp.float32) * k_scale
    if dtype == jnp.float16 and q_in.dtype != jnp.float16:
        q_in = jnp.clip(q_in.astype(jnp.float32), -F16_MAX, F16_MAX)  # no inf from a bf16/f32 outlier
    return q_in, scale


def swizzled(d, itemsize):
    """Tiling + swizzle transforms of a [*, d] shared-memory tile (128-byte swizzle where a row is that wide)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = min(128, d * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def staged_operand(staging, fp8, dtype, k_in_registers=False):
    """operand(stage_ref, slot, which): the 16-bit tile wgmma reads -- the stage itself, or (fp8
    pools) its copy converted into staging[which] (0: K, 1: V). One staging tile for both (``lean_smem``):
    a warpgroup barrier before each conversion, so that no warp overwrites the tile while another
    one's wgmma that read it (its accumulator already waited for by this warp) is not yet past it.
    ``k_in_registers`` (fp8): K is loaded from its stage straight into registers in the layout an
    8-bit tile upcasts from, converted there and handed to the wgmma as its A operand (no staging
    store, no fence); staging[0] is V's tile."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    shared = fp8 and len(staging) == 1 and not k_in_registers

    def operand(stage_ref, slot, which):
        if not fp8:
            return stage_ref.at[slot]
        if k_in_registers and which == 0:
            k8 = plgpu.load(stage_ref.at[slot], layout=plgpu.Layout.WGMMA_UPCAST_2X)
            return plgpu.layout_cast(k8.astype(dtype), plgpu.Layout.WGMMA)
        staged = staging[0 if shared or k_in_registers else which]
        if shared:
            plgpu.commit_smem()  # (a fence and the warpgroup barrier)
        staged[...] = stage_ref.at[slot][...].astype(dtype)
        plgpu.commit_smem()
        return staged

    return operand


def softmax_start(rows, d, swapped=False):
    """(acc [rows, d], running max m, running sum l) of an online softmax, in wgmma layouts
    (`swapped`: the transposed form, acc [d, rows], the query rows along the wgmma's N)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    vec = plgpu.Layout.WGMMA.reduce(0 if swapped else 1)
    m_i = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), vec)
    l_i = plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), vec)
    acc = plgpu.layout_cast(jnp.full((d, rows) if swapped else (rows, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    return acc, m_i, l_i


def log2_scores(s, scale, soft_cap):
    """Raw Q.K scores -> scaled (and soft-capped) scores in base 2."""
    if soft_cap is not None:
        return jnp.tanh(s * (scale / soft_cap)) * (soft_cap * LOG2E)
    return s * (scale * LOG2E)


def softmax_step(s, m_i, l_i, may_be_empty=True, swapped=False):
    """One online-softmax step over base-2 scores s [rows, tile] (`swapped`: [tile, rows]): (new
    max, the factor alpha that rescales what was accumulated, probabilities p, new sum).
    `may_be_empty`: a row may have seen only masked scores so far (its max is -inf), which must not
    make NaNs."""
    tokens = 0 if swapped else 1
    m_new = jnp.maximum(m_i, s.max(axis=tokens))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if may_be_empty else m_new
    alpha = jnp.exp2(m_i - m_safe)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [1 - tokens]))
    return m_new, alpha, p, l_i * alpha + p.sum(axis=tokens)


def softmax_finish(acc, l_i, swapped=False):
    """(acc normalized by the softmax sum, rows with no token) -- empty rows give zeros."""
    empty = l_i == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l_i))
    return acc * lax.broadcast_in_dim(inv, acc.shape, [1 if swapped else 0]), empty


def tile_pages(tables_ref, seq, first, copies, rows, block_size, width):
    """The page ids of the `copies` TMA copies of the K/V tile starting at token `first` of row
    `seq` (copy j moves `rows` tokens, <= block_size, that sit in one page; past the table: its last
    entry). All read before any copy is issued: each is a global load whose latency a copy issued in
    between would wait out on its own."""
    return tuple(tables_ref[seq, jnp.minimum(lax.div(first + j * rows, block_size), width - 1)] for j in range(copies))


def page_copy(pages, first, j, rows, block_size):
    """(pool rows, stage rows) of the j-th TMA copy of the tile starting at token `first` (pages:
    ``tile_pages``)."""
    import jax.experimental.pallas as pl

    token = first + j * rows
    return pl.ds(pages[j] * block_size + lax.rem(token, block_size), rows), pl.ds(j * rows, rows)


def fill_ring(stages, n_steps, issue):
    """Start the TMA copies of the first `stages` steps (those that exist)."""
    import jax.experimental.pallas as pl

    for i in range(stages):
        pl.when(i < n_steps)(lambda i=i: issue(i, i))


def qk_scores(q_smem, k_op, rows, tile, meanwhile=None, swapped=False):
    """Raw scores Q K^T [rows, tile] in float32 (one wgmma; `swapped`: K Q^T [tile, rows], the query
    rows along the wgmma's N); `meanwhile()` (if any) runs while the tensor cores work, between the
    wgmma's issue and the wait for its result."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    def scope(acc_ref):
        if swapped:
            plgpu.wgmma(acc_ref, k_op, q_smem.transpose((1, 0)))
        else:
            plgpu.wgmma(acc_ref, q_smem, k_op.transpose((1, 0)))
        if meanwhile is not None:
            meanwhile()
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((tile, rows) if swapped else (rows, tile), jnp.float32))


def refill_previous(step, stages, n_steps, issue):
    """Called after this step's QK wgmma: every thread of the warpgroup has passed it (and, fp8, the
    barrier of the conversions before it), and the previous step's PV wgmma completed before its
    accumulator was read, so the previous step's stage is free: refill it with the step `stages`
    after it."""
    import jax.experimental.pallas as pl

    prev = step - 1
    pl.when((step > 0) & (prev + stages < n_steps))(lambda: issue(prev + stages, lax.rem(prev, stages)))


def check_paged_args(h, kvh, block_size, block_kv, k_pool, v_pool) -> int:
    """The checks the paged kernels make on heads, pages, pools and KV tiles (block_kv None: a kernel
    that gathers its tiles row by row, whatever the page size); returns G, the query heads per KV
    head."""
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({kvh})")
    if block_size % 8 or not 8 <= block_size <= 256:
        raise ValueError(f"block_size must be a multiple of 8 in [8, 256], got {block_size}")
    kv_dtype = jnp.dtype(k_pool.dtype)
    if kv_dtype not in KV_DTYPES or v_pool.dtype != kv_dtype:
        raise ValueError(f"KV pool dtype must be bfloat16, float16 or float8_e4m3fn (both pools alike), got "
                         f"{kv_dtype} and {jnp.dtype(v_pool.dtype)}")
    if block_kv is not None and (block_kv % 64 or not (block_kv % block_size == 0 or block_size % block_kv == 0)):
        raise ValueError(f"block_kv must be a multiple of 64 that divides or is divided by block_size, got {block_kv}")
    return h // kvh


def step_scores(step, stages, n_steps, issue, k_bar, k_smem, operand, q_smem, rows, tile, scale, soft_cap,
                meanwhile=None, swapped=False):
    """The start of one ring step, the same in both kernels: wait for this step's K stage, Q K^T on
    the tensor cores (``meanwhile(slot)`` while they work), refill the stage the previous step
    freed, then scale (base 2, soft cap). Returns (the step's ring slot, the scores [rows, tile]).
    (The named scopes are the regions of a kernel profile, ``profile_dir``.)"""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    slot = lax.rem(step, stages)
    with jax.named_scope("wait_k"):
        plgpu.barrier_wait(k_bar.at[slot])
    with jax.named_scope("convert_k"):
        k_op = operand(k_smem, slot, 0)
    with jax.named_scope("qk"):
        s = qk_scores(q_smem, k_op, rows, tile, None if meanwhile is None else (lambda: meanwhile(slot)), swapped)
    with jax.named_scope("refill"):
        refill_previous(step, stages, n_steps, issue)
    return slot, log2_scores(s, scale, soft_cap)


def reference_decode_attention(q, k_pool, v_pool, block_tables, lengths, block_size, *, sm_scale=None,
                               soft_cap=None, sliding_window=None, k_scale=1.0, v_scale=1.0):
    """The same function in plain jnp, float32 throughout: q [B, H, D] -> [B, H, D] float32.

    The pools hold K / k_scale and V / v_scale (fp8 pools; 1.0 for the others): they are
    dequantized as read."""
    b, h, d = q.shape
    kvh = k_pool.shape[1]
    w = block_tables.shape[1]
    scale = d**-0.5 if sm_scale is None else sm_scale
    slot_idx = (block_tables[:, :, None] * block_size + jnp.arange(block_size)).reshape(b, w * block_size)
    k = k_pool[slot_idx].astype(jnp.float32) * k_scale  # [B, S, KVH, D]
    v = v_pool[slot_idx].astype(jnp.float32) * v_scale
    qg = q.astype(jnp.float32).reshape(b, kvh, h // kvh, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, precision="highest") * scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    pos = jnp.arange(w * block_size)
    mask = pos[None, :] < lengths[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] >= lengths[:, None] - sliding_window
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bkgs,bskd->bkgd", p, v, precision="highest").reshape(b, h, d)


SMEM_BYTES = 232448  # per block on Hopper (227 KiB)
PROFILE_EVENTS = 512  # profiler events a program may record (profile_dir; bounds-checked past that)


def _smem_besides_stages(d: int, tile: int, p_in_registers: bool, kv_bytes: int = 2, lean: bool = False,
                         hpp: int = 1, qrows: int = ROWS, k_in_registers: bool = False) -> int:
    """Shared memory of everything but the K/V stages: Q, O and the log-sum-exps, P (in shared memory
    unless ``p_in_registers``), the barriers and (fp8 pools, ``kv_bytes == 1``) the 16-bit staging
    tiles (V's alone with ``k_in_registers``). ``lean``: one staging tile for K and V, and the loop's
    buffers (P, staging; O too with several heads per program) scoped apart from the epilogue's O
    (see ``lean_smem``)."""
    q = qrows * d * 2 + 1024
    out = qrows * d * 2 + qrows * 4
    p = 0 if p_in_registers else qrows * tile * 2
    staging = 0 if kv_bytes != 1 else (1 if lean or k_in_registers else 2) * tile * d * 2
    if not lean:
        return q + out + p + staging
    loop = p + staging + (out if hpp > 1 else 0)
    return q + max(loop, 0 if hpp > 1 else out)


def _max_stages(d: int, tile: int, p_in_registers: bool, kv_bytes: int = 2, lean: bool = False,
                hpp: int = 1, qrows: int = ROWS, k_in_registers: bool = False) -> int:
    """The most K/V stages that fit in shared memory beside the rest (``_smem_besides_stages``)."""
    besides = _smem_besides_stages(d, tile, p_in_registers, kv_bytes, lean, hpp, qrows, k_in_registers)
    return (SMEM_BYTES - besides) // (2 * tile * d * kv_bytes)


def _check_heads_per_program(heads_per_program, kvh: int) -> int:
    """heads_per_program (None: 1) checked: a divisor of the KV heads."""
    if heads_per_program is None:
        return 1
    allowed = [n for n in range(1, kvh + 1) if kvh % n == 0]
    try:
        n = None if isinstance(heads_per_program, bool) else operator.index(heads_per_program)
    except TypeError:
        n = None
    if n not in allowed:
        raise ValueError(f"heads_per_program must divide the KV heads ({kvh}): one of {allowed} (or None for 1), "
                         f"got {heads_per_program!r}")
    return n


def _max_r0(h: int, rows_per_program: int) -> int:
    """The largest offset in its 8-row-aligned Q tile of a program's first query row
    (seq * h + p * rows_per_program): those rows are multiples of gcd(h, rows_per_program, 8)."""
    return 8 - math.gcd(h, rows_per_program, 8)


def choose_heads_per_program(batch: int, kv_heads: int, num_splits: int = 1, num_sms: int = 132) -> int:
    """A proposal for ``paged_decode_attention(heads_per_program=...)``, not yet measured: the largest
    divisor of ``kv_heads`` that still leaves at least 4 programs per SM (``batch * num_splits *
    kv_heads / heads_per_program >= 4 * num_sms``), else 1.

    The reasoning: at a large batch of short contexts (1024 sequences of ~150 tokens, 8 KV heads)
    each (head, sequence) program streams only 2-3 steps, so its fixed latency (the Q load, filling
    the ring, the epilogue's stores) is never hidden behind other work; serving several heads in one
    program pays it once for all of them, with the ring running on across heads. At a small batch the
    SMs need every program there is, so it stays 1. The threshold (4 programs per SM) is a guess; only
    JAXLLM_ATTN_HEADS_PER_PROGRAM=auto uses it: on an H100 at 1024 x 160 tokens (thirteenth session)
    1 / 2 / 4 / 8 heads took 270 / 269 / 272 / 256 us (fp8) -- the fixed costs it amortizes are not
    what bounds the kernel."""
    best = 1
    for n in range(1, kv_heads + 1):
        if kv_heads % n == 0 and batch * num_splits * (kv_heads // n) >= 4 * num_sms:
            best = n
    return best


MIN_SPLIT_STEPS = 8  # see _choose_splits


def _choose_splits(batch: int, kv_heads: int, steps: int, num_sms: int = 132) -> int:
    """Enough programs to fill the SMs twice, never splits shorter than MIN_SPLIT_STEPS steps.

    A split has a fixed cost (its Q load, filling the pipeline, and a share of the merge kernel,
    which a single split does not need): on the H100 at batch 1, a ~200-token context ran 0.04 ms
    per token faster as one split than as two (BENCHMARKS.md, sixth session)."""
    programs = batch * kv_heads
    want = max(1, -(-2 * num_sms // programs))
    most = max(1, steps // MIN_SPLIT_STEPS)
    return int(min(want, most, 64))


def paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, block_size: int, *, sm_scale=None,
                           soft_cap=None, sliding_window=None, block_kv=64, num_splits=None,
                           max_concurrent_steps: int = 2, p_in_registers: bool = False, heads_major: bool = False,
                           k_scale=1.0, v_scale=1.0, heads_per_program: int | None = None, lean_smem: bool = False,
                           prefetch_pages: bool = True, early_v: bool = False, swap_ab: bool = False,
                           k_in_registers: bool = False, heads_fastest: bool = False, profile_dir: str | None = None,
                           interpret=False):
    """Decode attention over paged KV. q [B, H, D]; pools [slots, KVH, D]; block_tables [B, W] int32;
    lengths [B] int32 (>= 1). Returns [B, H, D] in q's dtype.

    Pools are bfloat16, float16 or float8_e4m3fn; an fp8 pool holds K / k_scale and V / v_scale
    (floats, or scalar arrays: an array K scale is folded into q instead of the softmax scale).

    ``p_in_registers`` feeds the probabilities to the second wgmma from registers instead of
    shared memory (GPU only: the CPU interpreter's wgmma takes shared-memory operands).
    ``heads_major``: the pools are ``[kv_heads, slots, head_dim]`` (each page of a head contiguous).
    ``heads_per_program`` (a divisor of the KV heads; None: 1): each program serves that many
    consecutive KV heads of one (sequence, split), one after another, its TMA ring running on across
    the head boundary (see "Several KV heads per program" in the module docstring).
    ``prefetch_pages``: the refills' page ids read a step ahead (see the module docstring).
    ``profile_dir``: Mosaic GPU's in-kernel profiler writes a trace of every program's named regions
    (wait_k, convert_k, qk, refill, softmax, p_store, v, pv, epilogue) there (benchmarks only).
    ``swap_ab``: the transposed products, S^T = K Q^T and O^T = V^T P^T, so the G query rows are the
    wgmma's N (a multiple of 8) instead of its 64-row M (see "Swapped products" in the module
    docstring); P goes through shared memory (not with ``p_in_registers``).
    ``k_in_registers`` (``swap_ab`` over fp8 pools): each K tile, the first wgmma's A, goes from its
    stage into registers, is converted to 16 bits there and fed to the wgmma from registers -- no
    staging tile for K (16 KiB less a program), no store and fence on the step's serial path. GPU
    only (the CPU interpreter's wgmma takes shared-memory operands).
    ``early_v`` (fp8 pools with a staging tile each for K and V, i.e. not ``lean_smem``; no effect
    otherwise): a step's V stage is waited for and converted while the tensor cores run its Q K^T,
    instead of after the softmax -- the conversion off the warpgroup's serial path.
    ``lean_smem``: less shared memory per program, so that more programs fit an SM -- fp8 pools
    convert K and V into one staging tile (not one each), and the buffers only the loop needs (P,
    the staging tile) and those only the epilogue needs (O, the log-sum-exps; one head per program)
    live in scopes one after the other, sharing their bytes. fp8, block_kv 64, two stages: 104 KiB
    -> 72 KiB (64 KiB with ``p_in_registers``), three programs per SM instead of two.
    ``heads_fastest``: the order in which the GPU starts the programs. By default the sequences are
    the fastest-varying grid axis (Mosaic GPU puts the last grid axis on CUDA's x), so the programs
    that run together read one KV head's rows of many sequences -- over a ``[slots, KVH, D]`` pool
    128-byte (fp8) or 256-byte rows a ``KVH * D``-element stride apart, the rest of each token's
    bytes read a whole wave of programs later. With ``heads_fastest`` the KV heads vary fastest:
    the programs that run together read every head of a few sequences, whole tokens' bytes.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, h, d = q.shape
    kvh = k_pool.shape[0 if heads_major else 1]
    w = block_tables.shape[1]
    g = check_paged_args(h, kvh, block_size, block_kv, k_pool, v_pool)
    if g > ROWS:
        raise ValueError(f"at most {ROWS} query heads per KV head, got {g}")
    if d % 64:
        raise ValueError(f"head_dim must be a multiple of 64, got {d}")
    hpp = _check_heads_per_program(heads_per_program, kvh)
    if swap_ab and p_in_registers:
        raise ValueError("swap_ab takes P from shared memory: p_in_registers must be False")
    kv_dtype = jnp.dtype(k_pool.dtype)
    fp8 = kv_dtype == FP8
    if k_in_registers and not (swap_ab and fp8):
        raise ValueError(f"k_in_registers needs swap_ab=True and float8_e4m3fn pools (K is then the first wgmma's "
                         f"A operand, converted from 8 bits in registers), got swap_ab={swap_ab} and {kv_dtype.name}")
    dtype = jnp.dtype(jnp.float16) if fp8 else kv_dtype  # what the tensor cores read (see above)
    tile = block_kv
    rows_per_copy = min(block_size, tile)
    copies = tile // rows_per_copy
    total_steps = -(-w * block_size // tile)
    if num_splits is None:
        num_splits = _choose_splits(b, kvh, total_steps)
    steps_per_split = -(-total_steps // num_splits)
    split_tokens = steps_per_split * tile
    num_splits = -(-total_steps // steps_per_split)  # no split that is empty for every sequence
    # one Q load serves all the program's heads when their rows fit the tile at any offset r0
    q_shared = hpp == 1 or _max_r0(h, hpp * g) + hpp * g <= ROWS
    # the Q tile's rows: the wgmma's M (64), or swapped its N, the rows the program's heads need
    per_load = hpp * g if q_shared else g
    qrows = -(-(_max_r0(h, per_load) + per_load) // 8) * 8 if swap_ab else ROWS
    fit = _max_stages(d, tile, p_in_registers, kv_dtype.itemsize, lean_smem, hpp, qrows, k_in_registers)
    if fit < 2:
        raise ValueError(f"block_kv={tile} with head_dim {d} ({kv_dtype.name} pools) leaves no room for two stages "
                         f"in shared memory; use block_kv=64")
    # the ring runs over all the program's heads: up to hpp * steps_per_split steps
    stages = max(2, min(max_concurrent_steps, hpp * steps_per_split, fit))
    scale = (d**-0.5 if sm_scale is None else sm_scale)
    q_in, scale = tensor_core_q(q, scale, k_scale, dtype)

    # Q rows [B*H (+ padding), D]: padded only as far as the furthest qrows-row TMA box reaches (the
    # last sequence's last KV head's, from its 8-aligned start). With swap_ab's 8-row boxes and H a
    # multiple of 8 that is none: no copy of q, whose scaling / conversion then fuses into its producer.
    q_end = (b * h - g) // 8 * 8 + qrows
    q_rows = q_in.reshape(b * h, d).astype(dtype)
    if q_end > b * h:
        q_rows = jnp.pad(q_rows, ((0, q_end - b * h), (0, 0)))
    lengths = lengths.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)

    def kernel(tables_ref, lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, q_bar, k_bar,
               v_bar, *buffers):  # buffers: out_types + loop_types, unless lean_smem (then scoped below)
        head0 = lax.axis_index("kvh") if hpp == 1 else lax.axis_index("kvh") * hpp  # the program's first KV head
        split = lax.axis_index("split")
        seq = lax.axis_index("seq")
        length = lens_ref[seq]
        lo = split * split_tokens  # first token of this split
        hi = jnp.minimum(length, lo + split_tokens)  # one past its last token
        if sliding_window is not None:
            win_lo = length - sliding_window
            start = jnp.maximum(lo, lax.div(jnp.maximum(win_lo, 0), rows_per_copy) * rows_per_copy)
        else:
            win_lo = None
            start = lo
        n_steps = jnp.maximum(0, lax.div(hi - start + tile - 1, tile))  # per head

        def local(t):
            """(KV head, step within that head) of ring step t: the program's heads one after another."""
            if hpp == 1:
                return head0, t
            k = lax.div(t, jnp.maximum(n_steps, 1))
            return head0 + k, t - k * n_steps

        # TMA boxes into the tiled Q buffer start on a row multiple of 8: this group's G rows
        # sit at row r0 of the 64 loaded (q_shared: head head0 + k's at r0 + k * g).
        def q_start_of(head):
            q_first = seq * h + head * g
            q_start = lax.div(q_first, 8) * 8
            return q_start, q_first - q_start

        def load_q(q_start):
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_start, qrows)], q_smem, q_bar)

        q_start, r0 = q_start_of(head0)
        load_q(q_start)

        def q_row(head):  # the first row of this KV head's G in the Q tile
            if hpp == 1:
                return r0
            if q_shared:
                return r0 + (head - head0) * g
            return q_start_of(head)[1]

        def pages_of(t):  # the page ids of ring step t's copies (the same for every head)
            return tile_pages(tables_ref, seq, start + local(t)[1] * tile, copies, rows_per_copy, block_size, w)

        def issue(t, slot, pages=None):
            head, step = local(t)
            pages = pages_of(t) if pages is None else pages
            for j in range(copies):
                src, dst = page_copy(pages, start + step * tile, j, rows_per_copy, block_size)
                at = (head, src) if heads_major else (src, head)
                plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot, dst], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot, dst], v_bar.at[slot])

        n_total = n_steps if hpp == 1 else n_steps * hpp  # the ring's steps, all heads
        with jax.named_scope("fill"):
            fill_ring(stages, n_total, issue)

        plgpu.barrier_wait(q_bar)

        @jax.named_scope("epilogue")
        def store(out_bufs, head, acc, m_i, l_i):
            """Normalize and store one KV head's G output rows and its log-sum-exps."""
            o_smem, lse_smem = out_bufs
            out, empty = softmax_finish(acc, l_i, swap_ab)
            if hpp > 1:  # the previous head's stores must have read o_smem / lse_smem
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            (o_smem.transpose((1, 0)) if swap_ab else o_smem)[...] = out.astype(dtype)
            # log-sum-exp in base 2; -inf for a split with no tokens
            lse_smem[...] = jnp.where(empty, -jnp.inf, m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(q_row(head), g)], o_ref.at[split, seq, pl.ds(head * g, g)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[split, seq, head])

        def loop(*bufs):
            """The ring's steps over the program's heads, and with several heads per program their
            stores; bufs: the loop's buffers (see loop_types). Returns the last head's state."""
            bufs = list(bufs)
            p_smem = None if p_in_registers else bufs.pop(0)
            staging = [bufs.pop(0) for _ in range(n_staging)]
            operand = staged_operand(staging, fp8, dtype, k_in_registers)
            out_bufs = bufs  # several heads per program: O and the log-sum-exps
            v_early = early_v and n_staging == 2

            def convert_v(slot):  # V's stage, waited for and converted into its staging tile
                plgpu.barrier_wait(v_bar.at[slot])
                return operand(v_smem, slot, 1)

            def body(t, carry):
                acc, m_i, l_i, pages = carry  # pages: those of ring step t - 1 + stages, read a step ago
                head, step = local(t)
                if hpp > 1:
                    first = step == 0  # a new KV head: its softmax starts afresh

                    def restart(x, value):  # (Mosaic GPU selects only between arrays of one shape)
                        return lax.select(jnp.broadcast_to(first, x.shape), jnp.full(x.shape, value, x.dtype), x)

                    acc, m_i, l_i = restart(acc, 0.0), restart(m_i, -jnp.inf), restart(l_i, 0.0)
                    if not q_shared:  # its Q tile was loaded when the previous head finished
                        pl.when(first & (t > 0))(lambda: plgpu.barrier_wait(q_bar))
                refill = (lambda u, slot: issue(u, slot, pages)) if prefetch_pages else issue  # u = t - 1 + stages
                slot, s = step_scores(t, stages, n_total, refill, k_bar, k_smem, operand, q_smem, qrows, tile, scale,
                                      soft_cap, convert_v if v_early else None, swap_ab)
                if prefetch_pages:  # the next step's refill: the loads' latency hides behind this step
                    pages = pages_of(t + stages)
                pos = plgpu.broadcasted_iota(jnp.int32, (tile, qrows) if swap_ab else (qrows, tile), 0 if swap_ab else 1,
                                             layout=plgpu.Layout.WGMMA)
                pos = pos + (start + step * tile)
                valid = pos < hi
                if win_lo is not None:
                    valid = valid & (pos >= win_lo)
                with jax.named_scope("softmax"):
                    s = jnp.where(valid, s, -jnp.inf)
                    m_new, alpha, p, l_i = softmax_step(s, m_i, l_i, swapped=swap_ab)
                if p_in_registers:
                    p_op = p.astype(dtype)
                else:
                    with jax.named_scope("p_store"):
                        (p_smem.transpose((1, 0)) if swap_ab else p_smem)[...] = p.astype(dtype)
                        plgpu.commit_smem()
                    p_op = p_smem
                if v_early:
                    v_op = staging[1]
                else:
                    with jax.named_scope("v"):
                        v_op = convert_v(slot)

                def pv_scope(acc_ref):
                    if swap_ab:  # O^T += V^T P^T
                        plgpu.wgmma(acc_ref, v_op.transpose((1, 0)), p_op.transpose((1, 0)))
                    else:
                        plgpu.wgmma(acc_ref, p_op, v_op)
                    return acc_ref[...]

                with jax.named_scope("pv"):
                    pv = pl.run_scoped(pv_scope, plgpu.ACC((d, qrows) if swap_ab else (qrows, d), jnp.float32))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1 if swap_ab else 0]) + pv
                if hpp > 1:  # a head other than the last one finishes here, the last one after the loop

                    @pl.when((step == n_steps - 1) & (head < head0 + hpp - 1))
                    def _():
                        store(out_bufs, head, acc, m_new, l_i)
                        if not q_shared:  # store's commit_smem: the whole warpgroup is past this QK
                            load_q(q_start_of(head + 1)[0])

                return acc, m_new, l_i, pages

            start_state = softmax_start(qrows, d, swap_ab)
            *carry, _ = lax.fori_loop(0, n_total, body, (*start_state, pages_of(stages) if prefetch_pages else ()))
            if hpp > 1:
                # no step for this split: every head but the last stores the empty state here
                @pl.when(n_steps == 0)
                def _():
                    def empty(k, state):
                        store(out_bufs, head0 + k, *state)
                        return state

                    lax.fori_loop(0, hpp - 1, empty, softmax_start(qrows, d, swap_ab))

                store(out_bufs, head0 + hpp - 1, *carry)
            return carry

        if not lean_smem:
            out_bufs, loop_bufs = buffers[:2], buffers[2:]
            carry = loop(*loop_bufs, *(out_bufs if hpp > 1 else ()))
            if hpp == 1:
                store(out_bufs, head0, *carry)
        elif hpp > 1:
            pl.run_scoped(lambda *bufs: (loop(*bufs), None)[1], *loop_types, *out_types)
        else:
            carry = pl.run_scoped(loop, *loop_types) if loop_types else loop()

            def epilogue(*out_bufs):  # O's bytes are the loop's: past the barrier, every wgmma is done
                plgpu.commit_smem()
                store(out_bufs, head0, *carry)

            pl.run_scoped(epilogue, *out_types)
        plgpu.wait_smem_to_gmem(0)

    transforms = swizzled(d, 2)
    kv_transforms = swizzled(d, kv_dtype.itemsize)
    out_types = (plgpu.SMEM((qrows, d), dtype), plgpu.SMEM((qrows,), jnp.float32))  # O, log-sum-exps
    n_staging = 0 if not fp8 else 1 if lean_smem or k_in_registers else 2  # the 16-bit staging tiles of K and V
    loop_types = (() if p_in_registers else (plgpu.SMEM((qrows, tile), dtype, transforms=transforms),)) + (
        plgpu.SMEM((tile, d), dtype, transforms=transforms),) * n_staging
    scratch = (  # in the order of the kernel's scratch arguments
        plgpu.SMEM((qrows, d), dtype, transforms=transforms),  # q_smem
        plgpu.SMEM((stages, tile, d), kv_dtype, transforms=kv_transforms),  # k_smem
        plgpu.SMEM((stages, tile, d), kv_dtype, transforms=kv_transforms),  # v_smem
        plgpu.Barrier(num_arrivals=1),  # q_bar
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # k_bar
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),  # v_bar
    ) + (() if lean_smem else out_types + loop_types)
    o_parts, lse_parts = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((num_splits, b, h, d), dtype),
            jax.ShapeDtypeStruct((num_splits, b, kvh, qrows), jnp.float32),
        ),
        # the last grid axis varies fastest (CUDA's x): see heads_fastest
        grid=(b, num_splits, kvh // hpp) if heads_fastest else (kvh // hpp, num_splits, b),
        grid_names=("seq", "split", "kvh") if heads_fastest else ("kvh", "split", "seq"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True, **(
            dict(profile_space=PROFILE_EVENTS, profile_dir=profile_dir, profile_bounds_check=True) if profile_dir else {})),
        interpret=interpret,
    )(block_tables, lengths, q_rows, k_pool, v_pool)
    # each group's G rows start at row (its first flattened query row) % 8 of its 64 (q_shared: of
    # its program's 64, the heads' rows one after another)
    if hpp > 1 and q_shared:
        kv = jnp.arange(kvh)[None, :]
        r0 = (jnp.arange(b)[:, None] * h + (kv - kv % hpp) * g) % 8 + (kv % hpp) * g  # [B, KVH]
    else:
        r0 = (jnp.arange(b)[:, None] * h + jnp.arange(kvh)[None, :] * g) % 8  # [B, KVH]
    rows = r0[None, :, :, None] + jnp.arange(g)  # [1, B, KVH, G]
    lse = jnp.take_along_axis(lse_parts, jnp.broadcast_to(rows, (num_splits, b, kvh, g)), axis=3).reshape(num_splits, b, h)
    out = o_parts[0] if num_splits == 1 else _merge(o_parts, lse)
    if not (isinstance(v_scale, (int, float)) and v_scale == 1.0):
        out = out.astype(jnp.float32) * v_scale
    return out.astype(q.dtype)


def _merge(o_parts, lse):
    """Combine per-split normalized outputs [S, B, H, D] with their base-2 log-sum-exps [S, B, H]."""
    top = jnp.max(lse, axis=0)
    wts = jnp.exp2(lse - top[None])
    wts = wts / jnp.sum(wts, axis=0, keepdims=True)
    return jnp.einsum("sbh,sbhd->bhd", wts, o_parts.astype(jnp.float32))
