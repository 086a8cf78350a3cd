"""Latency of one small all-reduce between the local GPUs, as tensor-parallel decode issues them.

    python benchmarks/allreduce_latency.py [--sizes 8192 16384 1048576] [--iters 500] [--devices N]
        [--impl psum oneshot]

A jitted loop (unrolled by 25) of --iters dependent psums (shard_map over all local devices) of bf16 vectors of each
size in bytes; prints microseconds per all-reduce, and per iteration of the same loop without it. Run it under different XLA_FLAGS to compare
collective implementations. `--devices 1` runs the loop on the first GPU alone: is the per-iteration
cost of the loop without a collective (53-77 us on a 2x H200 VM) the two-device launch, or the VM?
`--impl oneshot` times jaxllm.pallas.allreduce's one-shot Mosaic GPU kernel (2 devices) after
checking its sums against lax.psum's.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 1 << 20])
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--devices", type=int, default=None, help="the first N local devices (default all)")
    ap.add_argument("--impl", nargs="+", default=["psum"], choices=["psum", "oneshot"])
    args = ap.parse_args()
    devs = jax.local_devices()[: args.devices]
    mesh = Mesh(np.asarray(devs), ("model",))
    from jaxllm.pallas.allreduce import one_shot_psum

    impls = {"psum": jax.lax.psum, "oneshot": one_shot_psum}
    if "oneshot" in args.impl:  # the kernel's sums against psum's, before timing it
        for size in args.sizes:
            x = jax.random.normal(jax.random.key(size), (len(devs) * size // 2,), jnp.bfloat16)
            got, want = (jax.jit(jax.shard_map(lambda y, f=f: f(y, "model"), mesh=mesh, in_specs=P("model"),
                                               out_specs=P("model"), check_vma=False))(x) for f in (one_shot_psum, jax.lax.psum))
            print(f"oneshot {size:>9} B: max |oneshot - psum| = {float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))}",
                  flush=True)
    runs = [(impl, s, True) for impl in args.impl for s in args.sizes] + [("-", args.sizes[0], False)]
    for impl, size, reduce in runs:
        n = size // 2
        allreduce = impls.get(impl)

        @jax.jit
        def loop(x):
            def body(_, y):  # without the psum: what the loop itself costs per iteration
                return (allreduce(y, "model") if reduce else y + y) * jnp.bfloat16(0.5)

            # unrolled by 25: XLA:GPU reads a while loop's predicate on the host every iteration
            f = jax.shard_map(lambda y: jax.lax.fori_loop(0, args.iters, body, y, unroll=25), mesh=mesh,
                              in_specs=P("model"), out_specs=P("model"), check_vma=False)
            return f(x)

        x = jnp.ones((len(devs) * n,), jnp.bfloat16)
        loop(x).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(3):
            x = loop(x)
        x.block_until_ready()
        us = (time.perf_counter() - t0) / (3 * args.iters) * 1e6
        what = f"all-reduce ({impl})" if reduce else "no-op loop"
        print(f"{what} {size:>9} B over {len(devs)} devices: {us:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
