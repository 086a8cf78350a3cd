"""One-shot all-reduce of a small array over a 2-device mesh axis, in one Mosaic GPU kernel.

Why it was written: at tensor parallelism 2 a batch-1 decode step of Llama-3.1-8B does 2
all-reduces of 8 KiB per layer, and they looked like the cost of the 6.7-7.1 ms tp=2 step.
TensorRT-LLM's answer is a custom "one-shot" all-reduce over NVLink peer memory; this is that,
written with Pallas's Mosaic GPU backend. Measured on 2x H100 (BENCHMARKS.md, seventh session) it
is exact but no faster than XLA's own collective kernels, which turned out not to be the cost, so
it is an opt-in mode (``JAXLLM_ROW_PARALLEL=oneshot``, ``sharding.TensorParallel``; on 2x H200 in
the ninth session 4.38 ms against 4.04 for NCCL's symmetric-memory all-reduce, now the default):

    each device writes its partial sums into its peer's receive buffer (``plgpu.remote_ref``: a
    store over NVLink), signals the peer's semaphore, waits for the peer's signal, and adds the
    received partials to its own.

Both devices then add the same two values (x0 + x1 == x1 + x0 in IEEE arithmetic), so the replicas
stay identical, as they do after a psum. The kernel runs inside ``jax.shard_map`` over an axis of
exactly 2 devices of one process; Mosaic GPU's cross-device barrier at launch (its default) makes
sure the peer has entered the same call (its receive buffer and semaphores exist) before any write.
The array is split into chunks of ``CHUNK`` elements, one CTA each; every CTA signals one
semaphore of the peer and waits until its own has counted all of the peer's chunks. Sizes past ``MAX_ELEMENTS`` (large prefill batches, where NCCL's bandwidth wins and
the latency does not matter) go to ``lax.psum``.
"""

from __future__ import annotations

import math

import jax
from jax import lax

CHUNK = 1024  # elements per CTA: 8 per thread of one warpgroup
MAX_ELEMENTS = 64 * 4096  # past this (512 KiB of bf16), lax.psum


def supported(shape, axis_size: int) -> bool:
    """Whether one_shot_psum serves an array of this shape over an axis of this size."""
    n = math.prod(shape)
    return axis_size == 2 and n % CHUNK == 0 and n <= MAX_ELEMENTS


def psum2(x, axis_name: str):
    """lax.psum(x, axis_name) for an axis of 2 devices: the one-shot kernel where it serves the
    size, else XLA's psum."""
    if not supported(x.shape, lax.axis_size(axis_name)):
        return lax.psum(x, axis_name)
    return one_shot_psum(x, axis_name)


def one_shot_psum(x, axis_name: str):
    """x summed over the 2 devices of axis_name (inside shard_map), by the kernel above."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    chunks = math.prod(x.shape) // CHUNK
    flat = x.reshape(chunks, CHUNK)

    def kernel(x_ref, o_ref, recv_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)  # zeroed per call (hence the launch barrier)
        c = lax.axis_index("c")
        other = {axis_name: 1 - lax.axis_index(axis_name)}  # the peer: same coordinates on the mesh's other axes
        mine = x_ref[c]
        plgpu.remote_ref(recv_ref, other)[c] = mine
        pl.semaphore_signal(sem, device_id=other)
        pl.semaphore_wait(sem, value=chunks, decrement=False)  # every chunk of the peer has landed
        o_ref[c] = mine + recv_ref[c]

    out, _ = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(flat.shape, x.dtype)] * 2,  # the sum, the receive buffer
        grid=(chunks,),
        grid_names=("c",),
    )(flat)
    return out.reshape(x.shape)
