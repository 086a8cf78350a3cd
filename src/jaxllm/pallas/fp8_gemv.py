"""Weight-only FP8 matmul for decode-sized batches: y = x @ (w * scale)^T reading the fp8 bytes (Mosaic GPU).

Layout: ``x [M, K]`` (M <= 64 rows: a decode step's batch), ``w [N, K]`` float8_e4m3fn stored
K-minor (PyTorch's ``[out, in]``, the layout jaxllm keeps fp8 weights in), ``scale [N]`` per output
channel. Returns ``[M, N]`` in x's dtype.

Why it is written this way
--------------------------
* A decode step is bound by the bytes of the weights: at batch 1 the 8B model reads each weight
  byte once for 2 FLOPs. XLA's weight-only path converts the fp8 weight to bf16 in one fusion and
  multiplies in another, so it never gets near the bandwidth of the fp8 bytes (8B shapes on an H100:
  4.98 ms per token against bf16's 6.25, where the fp8 bytes alone would take 2.4 ms). Here the
  weight tiles travel by TMA as fp8 into a ring of ``max_concurrent_steps`` shared-memory stages
  (one barrier each) and are converted in the SM, so HBM only ever sees the fp8 bytes.
* The transposed product ``y^T = w x^T`` puts the weight on wgmma's 64-row side (A: a ``[64,
  block_k]`` weight tile, the output channels) and the few activation rows on its narrow side (B:
  ``x^T``, M padded to a multiple of 8 -- wgmma's N can be as small as 8), so no tensor-core work is
  spent on padding rows of x beyond the next multiple of 8.
* wgmma's fp8 form wants both operands in fp8, and x in fp8 would lose far more than the weight's
  own rounding; so each weight stage is read into registers, converted to float16 (exact for every
  e4m3 value; Mosaic GPU's fp8 -> f16 ``cvt`` exists on every Hopper toolchain, fp8 -> bf16 needs
  PTX ISA 9.2) and stored into a staging tile the tensor cores read -- the scheme of the fp8 KV
  decode kernel. x is cast to float16 (exact for bf16 values between 6e-5 and 65504; clipped
  beyond), and accumulation is float32. The per-channel scale is applied once, on the output.
* Split-K: N / 64 programs would leave most of the 132 SMs idle for the 4096-wide projections, so
  the K range is split over ``num_splits`` programs that write float32 partial sums; a tiny jnp
  epilogue adds them and applies the scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .decode_attention import F16_MAX, FP8, fill_ring, swizzled

# Checked on an H100 (2026-11-26: the GPU tests pass, tokens equal the XLA path's) but slower than
# XLA's weight-only fp8 dot there (~1 TB/s of fp8 bytes against 1.1-1.6 TB/s; BENCHMARKS.md), so
# models use it only where JAXLLM_FP8_GEMV=1 asks for it. True would make it the default on one GPU
# (JAXLLM_FP8_GEMV=0 then keeps it off): for when it wins.
VERIFIED_ON_GPU = False

BLOCK_N = 64  # output channels per program (wgmma M)
MAX_ROWS = 64
SMEM_BYTES = 227 * 1024
TARGET_PROGRAMS = 264  # two per SM of an H100


def gemv_supported(m: int, n: int, k: int, block_k: int = 256) -> bool:
    """Whether fp8_gemv serves an [m, k] x [n, k]^T product (else use the XLA path)."""
    return 1 <= m <= MAX_ROWS and n % BLOCK_N == 0 and k % block_k == 0


def gemv_wanted(mesh) -> bool:
    """Whether fp8 models on this mesh run their decode-sized weight-only calls through fp8_gemv:
    one NVIDIA GPU (the kernel does not run per shard yet), and VERIFIED_ON_GPU or JAXLLM_FP8_GEMV=1."""
    import os

    flag = os.environ.get("JAXLLM_FP8_GEMV", "")
    on = flag == "1" or (VERIFIED_ON_GPU and flag != "0")
    return on and mesh.devices.size == 1 and mesh.devices.flat[0].platform == "gpu"


def reference_fp8_gemv(x, w, scale):
    """The same function in plain jnp (float32 products): [M, N] in x's dtype."""
    y = jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _stages_that_fit(rows: int, block_k: int) -> int:
    fixed = BLOCK_N * block_k * 2 + BLOCK_N * rows * 4 + 1024  # the f16 staging tile, the output, barriers
    per_stage = BLOCK_N * block_k + rows * block_k * 2  # an fp8 weight tile and an f16 x tile
    return (SMEM_BYTES - fixed) // per_stage


def fp8_gemv(x, w, scale, *, block_k: int = 256, num_splits: int | None = None, max_concurrent_steps: int = 4,
             accumulate_in_place: bool | None = None, interpret=False):
    """x [M, K] @ (w [N, K] float8_e4m3fn * scale [N, float32])^T -> [M, N] in x's dtype.

    ``accumulate_in_place`` (default: on the GPU, not in the interpreter, which cannot): each step's
    wgmma accumulates onto the running sum in its accumulator instead of into a fresh one that is
    then added. `interpret`: a ``plgpu.InterpretGPUParams`` (CPU tests)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n, k2 = w.shape
    if k2 != k:
        raise ValueError(f"x [M, K] and w [N, K] must share K, got {x.shape} and {w.shape}")
    if jnp.dtype(w.dtype) != FP8:
        raise ValueError(f"w must be float8_e4m3fn, got {jnp.dtype(w.dtype).name}")
    if scale.shape != (n,):
        raise ValueError(f"scale must be [N] = [{n}], got {scale.shape}")
    if block_k % 64 or block_k < 64:
        raise ValueError(f"block_k must be a multiple of 64, got {block_k}")
    if not gemv_supported(m, n, k, block_k):
        raise ValueError(f"fp8_gemv needs 1 <= M <= {MAX_ROWS}, N a multiple of {BLOCK_N} and K of block_k={block_k}; "
                         f"got M={m}, N={n}, K={k}")
    rows = -(-m // 8) * 8  # wgmma's N: a multiple of 8
    total_steps = k // block_k
    n_tiles = n // BLOCK_N
    if num_splits is None:
        num_splits = max(1, min(total_steps, -(-TARGET_PROGRAMS // n_tiles)))
    steps_per_split = -(-total_steps // num_splits)
    num_splits = -(-total_steps // steps_per_split)  # no empty split
    fit = _stages_that_fit(rows, block_k)
    if fit < 2:
        raise ValueError(f"block_k={block_k} leaves no room for two stages in shared memory")
    stages = max(1, min(max_concurrent_steps, steps_per_split, fit))
    in_place = not interpret if accumulate_in_place is None else accumulate_in_place
    f16 = jnp.dtype(jnp.float16)
    x_in = jnp.clip(x.astype(jnp.float32), -F16_MAX, F16_MAX).astype(f16)
    x_in = jnp.pad(x_in, ((0, rows - m), (0, 0)))

    def kernel(x_ref, w_ref, o_ref, w_smem, x_smem, staging, o_smem, bar):
        tile = lax.axis_index("n")
        split = lax.axis_index("split")
        first = split * steps_per_split
        n_steps = jnp.clip(total_steps - first, 0, steps_per_split)

        def issue(step, slot):
            k0 = (first + step) * block_k
            plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(tile * BLOCK_N, BLOCK_N), pl.ds(k0, block_k)], w_smem.at[slot],
                                    bar.at[slot])
            plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(k0, block_k)], x_smem.at[slot], bar.at[slot])

        fill_ring(stages, n_steps, issue)
        acc = plgpu.layout_cast(jnp.full((BLOCK_N, rows), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        def body(step, acc):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(bar.at[slot])
            staging[...] = w_smem.at[slot][...].astype(f16)
            plgpu.commit_smem()

            def scope(acc_ref):
                if in_place:
                    acc_ref[...] = acc
                plgpu.wgmma(acc_ref, staging, x_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            part = pl.run_scoped(scope, plgpu.ACC((BLOCK_N, rows), jnp.float32))
            # the wgmma has completed (its accumulator was read): this stage is free for the step
            # `stages` later, and the staging tile for the next step's conversion
            pl.when(step + stages < n_steps)(lambda: issue(step + stages, slot))
            return part if in_place else acc + part

        acc = lax.fori_loop(0, n_steps, body, acc)
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, pl.ds(tile * BLOCK_N, BLOCK_N)])
        plgpu.wait_smem_to_gmem(0)

    scratch = (  # in the order of the kernel's scratch arguments
        plgpu.SMEM((stages, BLOCK_N, block_k), FP8, transforms=swizzled(block_k, 1)),  # w_smem
        plgpu.SMEM((stages, rows, block_k), f16, transforms=swizzled(block_k, 2)),  # x_smem
        plgpu.SMEM((BLOCK_N, block_k), f16, transforms=swizzled(block_k, 2)),  # staging
        plgpu.SMEM((BLOCK_N, rows), jnp.float32),  # o_smem
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # bar: the weight and the x copy
    )
    parts = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_splits, n, rows), jnp.float32),
        grid=(n_tiles, num_splits),
        grid_names=("n", "split"),
        scratch_types=scratch,
        interpret=interpret,
    )(x_in, w)
    y = jnp.sum(parts, axis=0)[:, :m].T * scale.astype(jnp.float32)[None, :]
    return y.astype(x.dtype)
