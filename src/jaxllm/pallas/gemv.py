"""Decode-sized matmuls at the bandwidth of the weight bytes: y = x @ w for a few rows of x (Pallas,
Triton backend). Models use it through ``gemv_wanted`` (JAXLLM_GEMV; models/quant.py:
``plain_gemv``): by default on NVIDIA GPUs for fp8 weights times one row (batch 1 on an H100:
4.49 -> 4.22 ms, BENCHMARKS.md "Eighth session"); ``benchmarks/gemv.py`` sweeps its tilings
against XLA's dot.

Why: at batch 1 a decode step reads every weight once, so each projection should stream its
weight at HBM bandwidth. XLA's weight-only fp8 dot converts in the GEMM at ~2.3 TB/s of fp8 bytes,
and at the small shapes of a tensor-parallel shard (q, k/v, o) its dot runs at 0.4-0.9 TB/s.

Here the grid is (N / block_n) x splits: each program owns block_n output columns and one of
`splits` equal slices of K and walks its slice in block_k steps (Triton pipelines the loads over
`num_stages`). One row (``fma``): float32 multiply-adds and a reduction per block; more rows: a
tensor-core dot (x's rows padded to 16, the smallest dot Triton takes; one row is broadcast to 16
in registers with rows 1-15 masked to zero, so no pad kernel runs before it). With one split the
kernel writes the result (per-channel scale applied); with more, float32 partials are added (and
the scale applied) in one small jnp epilogue.

With ``act="silu_mul"`` x is a gate/up projection's output [M, 2K] and the kernel multiplies
silu(gate) * up, computed as its blocks are read (float32, rounded once to x's dtype): the MLP's
down projection without the elementwise kernel before it. With ``partials=True`` a split-K product
at one row comes back as its float32 partial sums [splits, 1, N] for a consumer to add
(pallas.add_norm), instead of through the jnp epilogue.

Layouts: ``w [K, N]`` (plain, jaxllm's bf16 projections) or, with ``k_minor=True``, ``w [N, K]``
(jaxllm's fp8 weights, PyTorch's [out, in]); an fp8 weight is converted in registers, so HBM sees
only its bytes.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from .add_norm import _normed as add_norm_normed, _residual as add_norm_residual, add_rmsnorm_fits

ROWS = 16  # x's rows are padded to this (the smallest M of a Triton dot)


def gemv_fits(m: int, k: int, n: int, block_n: int, block_k: int, splits: int) -> bool:
    """Whether gemv serves an [m, k] x [k, n] product with this tiling."""
    return 1 <= m <= ROWS and n % block_n == 0 and k % (splits * block_k) == 0


TILING_ENV = "JAXLLM_GEMV_TILING"


def forced_tiling(k: int, n: int) -> dict | None:
    """The tiling JAXLLM_GEMV_TILING names for a K x N weight, else None: for in-model A/Bs of the
    tilings benchmarks/gemv.py times alone (read when a model traces). Its value is
    ``KxN=block_n,block_k,splits[,num_warps[,unroll]]`` entries separated by ``;``, e.g.
    ``4096x2048=8,2048,1;4096x4096=32,512,1,8`` (``/`` may stand for ``,``: the device scripts'
    variant lists split on commas)."""
    value = os.environ.get(TILING_ENV, "").strip()
    for entry in filter(None, (e.strip() for e in value.split(";"))):
        try:
            shape, _, numbers = entry.partition("=")
            kk, nn = (int(v) for v in shape.lower().split("x"))
            fields = [int(v) for v in numbers.replace("/", ",").split(",")]
            if len(fields) not in (3, 4, 5) or min(fields) < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{TILING_ENV}={value!r}: expected entries 'KxN=block_n,block_k,splits[,num_warps[,unroll]]' "
                             "of positive integers separated by ';'") from None
        if (kk, nn) == (k, n):
            return dict(zip(("block_n", "block_k", "splits", "num_warps", "unroll"), fields))
    return None


WIDE_N = 16384  # gemv_tiling: a one-row fp8 product at least this wide reads whole short rows, 4 a program


def gemv_tiling(m: int, k: int, n: int, itemsize: int = 2, k_minor: bool = True, act: str | None = None,
                out_act: str | None = None) -> dict | None:
    """A tiling for an [m, k] x [k, n] product whose weight has `itemsize` bytes per element; None
    where none fits. Chosen from the H100 sweeps (BENCHMARKS.md "Eighth session", "Seventeenth
    session"): a one-byte weight (fp8, int8) times one row: multiply-adds (`fma`) over blocks of 32
    columns x 512 bytes of K stored [N, K] (k_minor) -- but a wide weight with short rows (N >=
    WIDE_N, K <= 4096: the gate/up projection, an fp8 LM head) in blocks of 4 whole rows, one step
    a program (XLA's row-reduction pattern: 40.9 vs 43.6 us for 8B's gate/up on an H100; one
    returning silu(gate) * up: one row of each half a program and one warp, K read 1024 bytes a
    step with every step's loads issued at once -- 40.4 vs 42.4 us for 2 + 2 whole rows, twentieth
    session), -- of
    256 columns x 64 of K stored [K, N] (512 / 256 contiguous bytes a row; the [K, N] tiling is not
    measured yet);
    else a tensor-core dot over 128 columns where that gives most SMs a block (no split: the
    kernel writes the result), 64 otherwise, 64 K at a time. Then, unless a dot already has 96
    column blocks, K is split in two until there are two programs per SM (264; 256 for a dot) or a
    split would walk fewer than 2 steps. `act` / `out_act`: gemv's (a product computing silu * up
    as it reads x keeps the 32-column blocks, which compute it once for 32 columns; one returning
    silu(gate) * up takes half the columns of each half a program, and one split -- except a forced
    tiling, returned as forced: models/quant.py plain_gemv then runs the product alone)."""
    fma = itemsize == 1 and m == 1
    forced = forced_tiling(k, n)
    if forced is not None:
        if not gemv_fits(m, k, n, forced["block_n"], forced["block_k"], forced["splits"]):
            raise ValueError(f"{TILING_ENV}: {forced} does not fit a [{m}, {k}] x [{k}, {n}] product "
                             f"(n % block_n == 0, k % (splits * block_k) == 0, rows <= {ROWS})")
        return dict(forced, fma=fma)
    if fma and k_minor and n >= WIDE_N and n % 4 == 0 and k <= 4096 and k & (k - 1) == 0:
        if out_act:  # one row of gate and one of up a program, one warp, every K step's loads issued at once
            block_k = min(k, 1024)
            return dict(block_n=1, block_k=block_k, splits=1, num_warps=1, unroll=k // block_k, fma=True)
        return dict(block_n=4, block_k=k, splits=1, fma=True)
    if out_act:
        t = gemv_tiling(m, k, n // 2, itemsize, k_minor)  # each half's columns
        return None if t is None or not t["fma"] else dict(t, splits=1)
    if fma and k_minor and act is None and n % 2 == 0 and k % 2048 == 0:  # narrow blocks, one warp
        return dict(block_n=2, block_k=1024, splits=2, num_warps=1, fma=True)
    if fma and k_minor:
        block_n = next((b for b in (32, 16) if n % b == 0), None)
        block_k = next((b for b in (512, 256, 128, 64, 32, 16) if k % b == 0), None)
    elif fma:
        block_n = next((b for b in (256, 128, 64, 32, 16) if n % b == 0), None)
        block_k = next((b for b in (64, 32, 16) if k % b == 0), None)
    else:
        block_n = 128 if n % 128 == 0 and n // 128 >= 96 else next((b for b in (64, 32, 16) if n % b == 0), None)
        block_k = next((b for b in (64, 32, 16) if k % b == 0), None)
    if not 1 <= m <= ROWS or block_n is None or block_k is None:
        return None
    steps, splits = k // block_k, 1
    programs = 264 if fma else (256 if n // block_n < 96 else 0)
    while (n // block_n) * splits < programs and steps % (2 * splits) == 0 and steps // (2 * splits) >= 2:
        splits *= 2
    return dict(block_n=block_n, block_k=block_k, splits=splits, fma=fma)


# The largest weight (K x N elements) that JAXLLM_GEMV=small sends here: the q/k/v and output
# projections, which XLA's dot leaves on too few SMs (448-887 GB/s on an H100), while its larger
# GEMVs (gate/up, down) already stream at 2.4-2.8 TB/s (BENCHMARKS.md "Eighth session").
# JAXLLM_GEMV_SMALL_MAX (elements, read at import) moves the line for an A/B: 7168 * 4096 takes a
# tp=2 shard's down projection too (26.0 vs XLA's 38.6 us alone on an H100; not measured in the model).
SMALL_WEIGHT = int(os.environ.get("JAXLLM_GEMV_SMALL_MAX", 4096 * 4096))
MODES = {"0": "", "1": "all", "small": "small", "auto": "auto"}


def triton_available() -> bool:
    """Whether this JAX still has the Pallas Triton backend (deprecated upstream in favour of Mosaic
    GPU): auto falls back to XLA's dot without it."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gemv_wanted(mesh) -> str:
    """Which decode-sized matmuls models on this mesh run through gemv (JAXLLM_GEMV): "all" (1),
    "small" (weights of at most SMALL_WEIGHT elements), "quantized" (fp8 weights, stored [N, K],
    times one row, where the multiply-add kernel beats XLA's converting dot) or "" (0). The default,
    auto, on NVIDIA GPUs: "quantized" on one device, "small" under tensor parallelism with the
    projections in shard_map (JAXLLM_ROW_PARALLEL=psum, the default on GPUs: tp=2 4.70 -> 4.17 ms on
    2x H200); "" elsewhere (and where JAX has no Pallas Triton backend). A mesh of several devices
    takes the kernel only with the projections in shard_map (JAXLLM_ROW_PARALLEL psum or oneshot,
    sharding.TensorParallel), where each device's kernel sees its shard."""
    from ..sharding import row_parallel_mode

    value = os.environ.get("JAXLLM_GEMV", "auto")
    if value not in MODES:
        raise ValueError(f"JAXLLM_GEMV={value!r}: expected one of {sorted(MODES)}")
    several = mesh.devices.size > 1
    if several and row_parallel_mode(mesh) not in ("psum", "oneshot"):
        return ""
    if value == "auto":
        on_gpu = mesh.devices.flat[0].platform == "gpu" and triton_available()
        return ("small" if several else "quantized") if on_gpu else ""
    return MODES[value]


ACTS = ("silu_mul",)  # gemv's `act`: what the kernel computes from x before the product


def _silu_times(g, u, dtype):
    """silu(g) * u computed in float32 from g and u (any dtype), rounded once to dtype: the one
    arithmetic of silu_mul, the kernel's `act` and its `out_act` (their exactness rests on it)."""
    g, u = g.astype(jnp.float32), u.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * u).astype(dtype)


def silu_mul(x):
    """act "silu_mul": x [M, 2K] (a gate/up projection's output: gate, then up) -> silu(gate) * up
    [M, K], in float32 and rounded once to x's dtype (the model rounds silu and the product apart)."""
    k = x.shape[-1] // 2
    return _silu_times(x[..., :k], x[..., k:], x.dtype)


def reference_gemv(x, w, scale=None, k_minor: bool = False, act: str | None = None):
    """The same product in plain jnp (float32 accumulation), in x's dtype."""
    if act is not None:
        x = silu_mul(x)
    wf = w.astype(jnp.float32)
    y = jnp.einsum("mk,nk->mn" if k_minor else "mk,kn->mn", x.astype(jnp.float32), wf, precision="highest")
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def _unrolled_loop(steps: int, body, init, unroll: int):
    """fori_loop(0, steps, body, init) with `unroll` steps a loop body, written out here (Pallas
    Triton's scan lowering takes no unroll); the steps left over after the loop are written out
    after it, and all of them where fewer than two loop bodies would run (no loop at all)."""
    unroll = max(1, min(unroll, steps))
    if unroll == 1:
        return jax.lax.fori_loop(0, steps, body, init)

    def run(first, count, acc):
        for u in range(count):
            acc = body(first + u, acc)
        return acc

    loops = steps // unroll if steps // unroll >= 2 else 0
    acc = jax.lax.fori_loop(0, loops, lambda c, a: run(c * unroll, unroll, a), init) if loops else init
    return run(unroll * loops, steps - unroll * loops, acc)


@functools.partial(jax.jit, static_argnames=("k_minor", "block_n", "block_k", "splits", "num_warps", "num_stages",
                                             "fma", "out_dtype", "act", "out_act", "partials", "eps", "unroll", "sum_last",
                                             "interpret"))
def gemv(x, w, scale=None, residual=None, norm_w=None, *, k_minor: bool = False, block_n: int = 128,
         block_k: int = 64, splits: int = 4, num_warps: int = 4, num_stages: int = 4, fma: bool = False,
         out_dtype=None, act: str | None = None, out_act: str | None = None, partials: bool = False,
         eps: float = 1e-6, unroll: int = 1, sum_last: bool = False,
         interpret: bool = False):
    """x [M, K] @ w ([K, N], or [N, K] with k_minor) (* scale [N]) -> [M, N] in out_dtype (default x's).

    With `fma` (one row only) the products are plain multiply-adds in float32 and a reduction over
    each block's K, instead of a tensor-core dot of x padded to 16 rows. With one split the kernel
    writes the result itself (scale applied, in out_dtype): no jnp epilogue, no extra kernel.
    `act` "silu_mul": x is [M, 2K] (gate, then up) and the product is silu(gate) * up @ w, the
    activation computed as x is read (an MLP's down projection without its own elementwise kernel).
    `out_act` "silu_mul" (one row, fma, k_minor, one split): w [2F, K] holds gate's rows, then up's
    (a gate/up projection), and the kernel returns silu(gate) * up [1, F] -- each program computes
    its columns of both halves, rounds them to out_dtype as the projection would, and applies the
    activation as act's silu_mul does (the down projection then reads it plainly).
    `partials`: with several splits and one row, return the float32 partial sums [splits, 1, N]
    (scale applied to each) instead of adding them in a jnp epilogue -- for a consumer that adds
    them itself (pallas.add_norm), one kernel fewer; otherwise the result as usual.

    `residual` [1, N] and `norm_w` [N] (one row, split K; models use it only with
    JAXLLM_GEMV_NORM_EPILOGUE=1: no faster on an H100, BENCHMARKS.md "Seventeenth session"):
    the residual add and the RMSNorm after the projection finished by the kernel's last program
    (pallas.add_norm.add_rmsnorm's arithmetic), returning (h, n) instead of the product -- the
    program that finishes last, counted by an atomic on a zeroed counter it sets back to 0, adds the
    partial sums every program stored, so the add + norm kernel after the projection (and its
    launch) is not needed.

    `unroll`: the K loop's steps a loop body (fori_loop's unroll; steps for all of them), so the
    loads of several steps are issued before their sums (benchmarks/gemv_sweep.py --unroll).
    `sum_last` (fma, k_minor, no out_act): each thread keeps float32 sums of its own elements of
    the [block_n, block_k] block across the steps and the block is reduced across threads once, at
    the end (XLA's row reduction), instead of a reduction every step."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if act not in (None,) + ACTS or out_act not in (None,) + ACTS:
        raise ValueError(f"gemv: act={act!r} / out_act={out_act!r}: expected None or one of {ACTS}")
    m, k = x.shape
    if act is not None:  # x holds gate and up: the product's K is half its width
        k //= 2
    n = w.shape[0] if k_minor else w.shape[1]
    if not gemv_fits(m, k, n, block_n, block_k, splits) or (fma and m != 1):
        raise ValueError(f"gemv: [{m}, {k}] x [{k}, {n}] does not fit block_n={block_n}, block_k={block_k}, "
                         f"splits={splits} (rows <= {ROWS}, one with fma; n % block_n == 0, k % (splits * block_k) == 0)")
    steps = k // (splits * block_k)
    # one row through the dot: broadcast to 16 rows in registers, rows 1-15 masked to zero (no pad
    # kernel), and the rows of the product added (exact: zeros); more rows are padded to 16
    one = m == 1 and not fma
    rows = 1 if fma or one else ROWS
    xp = x if rows == 1 else jnp.pad(x, ((0, ROWS - m), (0, 0)))
    finish = residual is not None
    if finish and (m != 1 or rows != 1 or splits < 2 or norm_w is None or residual.shape != (1, n)
                   or norm_w.shape != (n,) or not add_rmsnorm_fits(1, n)):
        raise ValueError(f"gemv: residual {residual.shape} / norm_w {None if norm_w is None else norm_w.shape}: the add + "
                         f"norm epilogue takes one row of [1, {n}] and [{n}] (n a power of two), split K, fma or one "
                         "row through the dot")
    gated = out_act is not None
    if sum_last and not (fma and k_minor and not gated):
        raise ValueError("gemv: sum_last takes one row (fma) of a K-minor weight without out_act")
    if gated and not (fma and k_minor and splits == 1 and m == 1 and n % (2 * block_n) == 0 and not finish):
        raise ValueError(f"gemv: out_act={out_act!r} takes one row (fma), w [2F, K] stored K-minor with F % block_n "
                         f"== 0 and one split, got [{m}, {k}] x [{n}, {k}], block_n={block_n}, splits={splits}")
    direct = splits == 1
    raw = (partials or finish) and not direct and rows == m  # the partials scaled in the kernel
    with_scale = (direct or raw) and scale is not None
    out_dtype = out_dtype or x.dtype
    programs = (n // block_n) * splits

    def finish_row(o_ref, res_ref, nw_ref, cnt_ref, h_ref, n_ref):
        """The last program to finish adds every program's partials, the residual, and normalizes."""
        if not interpret:  # every thread's partials stored before the counter moves (no interpret rule)
            pltriton.debug_barrier()
        done = pltriton.atomic_add(cnt_ref, (jnp.zeros((), jnp.int32),), jnp.int32(1))  # a scalar: one thread adds, all see it

        @pl.when(done == programs - 1)
        def _():
            y = jnp.sum(o_ref[...], axis=0)  # [1, n] float32
            h = add_norm_residual(res_ref[...], y, res_ref.dtype)
            h_ref[...] = h
            n_ref[...] = add_norm_normed(h, nw_ref[...], eps).astype(n_ref.dtype)
            cnt_ref[pl.ds(0, 1)] = jnp.zeros((1,), jnp.int32)  # ready for the next call

    def kernel(x_ref, w_ref, *refs):
        o_ref = refs[-3] if finish else refs[-1]
        j, s = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        ups = pl.ds(pl.multiple_of(n // 2 + j * block_n, block_n), block_n) if gated else None  # up's columns

        def load_x(row, off):  # x's block at K offset `off` (under act, silu(gate) * up), in x's dtype
            if act is None:
                return x_ref[row, pl.ds(off, block_k)]
            return _silu_times(x_ref[row, pl.ds(off, block_k)], x_ref[row, pl.ds(k + off, block_k)], x_ref.dtype)

        def body(i, acc):
            off = pl.multiple_of((s * steps + i) * block_k, block_k)
            if gated:  # gate's columns and up's (n // 2 rows further)
                xs = load_x(0, off).astype(jnp.float32)
                return tuple(a + jnp.sum(w_ref[c, pl.ds(off, block_k)].astype(jnp.float32) * xs[None, :], axis=1)[None]
                             for a, c in zip(acc, (cols, ups)))
            if fma:
                xs = load_x(0, off).astype(jnp.float32)  # [block_k]
                if sum_last:
                    return acc + w_ref[cols, pl.ds(off, block_k)].astype(jnp.float32) * xs[None, :]
                if k_minor:
                    ws = w_ref[cols, pl.ds(off, block_k)].astype(jnp.float32)  # [block_n, block_k]
                    return acc + jnp.sum(ws * xs[None, :], axis=1)[None]
                ws = w_ref[pl.ds(off, block_k), cols].astype(jnp.float32)  # [block_k, block_n]
                return acc + jnp.sum(ws * xs[:, None], axis=0)[None]
            xs = load_x(slice(None), off)
            if one:  # [1, block_k] -> [16, block_k], row 0 only
                first = jax.lax.broadcasted_iota(jnp.int32, (ROWS, block_k), 0) == 0
                xs = jnp.where(first, jnp.broadcast_to(xs, (ROWS, block_k)), jnp.zeros((), xs.dtype))
            if k_minor:
                ws = w_ref[cols, pl.ds(off, block_k)].astype(xs.dtype)  # [block_n, block_k]
                return acc + jax.lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ws = w_ref[pl.ds(off, block_k), cols].astype(xs.dtype)  # [block_k, block_n]
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        zero = jnp.zeros((ROWS if one else rows, block_n), jnp.float32)
        if gated:
            acc_g, acc_u = _unrolled_loop(steps, body, (zero, zero), unroll)
            if scale is not None:
                acc_g = acc_g * refs[0][cols].astype(jnp.float32)[None]
                acc_u = acc_u * refs[0][ups].astype(jnp.float32)[None]
            # each half rounded as the projection would round it, then silu_mul's arithmetic
            o_ref[...] = _silu_times(acc_g.astype(o_ref.dtype), acc_u.astype(o_ref.dtype), o_ref.dtype)
            return
        if sum_last:
            acc = jnp.sum(_unrolled_loop(steps, body, jnp.zeros((block_n, block_k), jnp.float32), unroll), axis=1)[None]
        else:
            acc = _unrolled_loop(steps, body, zero, unroll)
        if one:
            acc = jnp.sum(acc, axis=0, keepdims=True)
        if with_scale:
            acc = acc * refs[0][cols].astype(jnp.float32)[None]
        if finish:  # the whole partials array is this kernel's (the last program reads all of it)
            o_ref[pl.ds(s, 1), :, cols] = acc[None]
            finish_row(o_ref, *refs[with_scale : with_scale + 3], *refs[-2:])
            return
        o_ref[...] = acc.astype(o_ref.dtype) if direct else acc[None]

    if finish:
        dtype = residual.dtype
        operands = (xp, w) + ((scale.astype(jnp.float32),) if with_scale else ()) + (
            residual, norm_w, jnp.zeros((1,), jnp.int32))
        _, h, n_out = pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct((splits, 1, n), jnp.float32), jax.ShapeDtypeStruct((1, n), dtype),
                       jax.ShapeDtypeStruct((1, n), dtype)),
            grid=(n // block_n, splits),
            in_specs=[pl.BlockSpec()] * len(operands),
            out_specs=[pl.BlockSpec()] * 3,
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
        )(*operands)
        return h, n_out
    if gated:
        out_shape = jax.ShapeDtypeStruct((1, n // 2), out_dtype)
        out_spec = pl.BlockSpec((1, block_n), lambda j, s: (0, j))
    elif direct:
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
        out_spec = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
        out_spec = pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j))
    operands = (xp, w) + ((scale.astype(jnp.float32),) if with_scale else ())
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=((n // 2 if gated else n) // block_n, splits),
        in_specs=[pl.BlockSpec()] * len(operands),  # whole arrays: loads slice them
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*operands)
    if gated:
        return out
    if direct:
        return out if rows == m else out[:m]
    if raw:
        return out
    y = jnp.sum(out[:, :m], axis=0)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(out_dtype)
