"""Compile time and step time of an 8B-shaped decode step in three program layouts.

    python benchmarks/decode_step_variants.py --variant unrolled|scan|fused [--batch 1 64] [--layers 32] [--dump DIR]

A Llama-3.1-8B-shaped decoder (random bf16 weights; attention over a small contiguous KV cache per
layer, whose cost is negligible next to the weights), 16 decode steps per jitted call in a while
loop, as the runner does. Variants:
  unrolled  the layers unrolled, seven projections per layer (jaxllm's model today)
  scan      every layer's weights stacked along a leading axis, one traced layer in a `lax.scan`
            (does XLA:GPU read each layer's weights in place, or copy the slice first?)
  fused     unrolled, with q/k/v as one [E, (H + 2 KV) D] projection and gate/up as one [E, 2F]:
            four matmuls per layer instead of seven (does it pay at batch 1 / 64?)
Prints one JSON line per batch size: compile seconds, ms per step, weight bytes per ms. Run each
variant in its own process (XLA_FLAGS are per process).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

E, H, KV, D, F, V = 4096, 32, 8, 128, 14336, 128256
CTX = 256


def layer_shapes():
    return dict(ln1=(E,), q=(E, H * D), k=(E, KV * D), v=(E, KV * D), o=(H * D, E), ln2=(E,),
                gate=(E, F), up=(E, F), down=(F, E))


def rms(x, w):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5) * w.astype(jnp.float32)).astype(x.dtype)


def _decoder_layer(p, x, kc, vc, pos, qkv, gate_up):
    """x [B, E]; kc / vc [B, CTX, KV, D] (this layer's cache); pos: scalar position. qkv(h) gives
    q, k, v as [B, heads * D]; gate_up(h) gives gate and up [B, F]."""
    b = x.shape[0]
    q, k, v = qkv(rms(x, p["ln1"]))
    q = q.reshape(b, KV, H // KV, D)
    kc = jax.lax.dynamic_update_slice(kc, k.reshape(b, 1, KV, D), (0, pos, 0, 0))
    vc = jax.lax.dynamic_update_slice(vc, v.reshape(b, 1, KV, D), (0, pos, 0, 0))
    s = jnp.einsum("bkgd,bskd->bkgs", q, kc, preferred_element_type=jnp.float32) / D**0.5
    s = jnp.where(jnp.arange(CTX) <= pos, s, -jnp.inf)
    a = jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(s, -1).astype(x.dtype), vc).reshape(b, H * D)
    x = x + a @ p["o"]
    g, u = gate_up(rms(x, p["ln2"]))
    x = x + (jax.nn.silu(g) * u) @ p["down"]
    return x, kc, vc


def layer(p, x, kc, vc, pos):
    """Seven matmuls: q, k, v, o, gate, up, down."""
    return _decoder_layer(p, x, kc, vc, pos, lambda h: (h @ p["q"], h @ p["k"], h @ p["v"]),
                          lambda h: (h @ p["gate"], h @ p["up"]))


def fused_layer(p, x, kc, vc, pos):
    """Four: q/k/v as one (p["qkv"] [E, (H + 2 KV) D]), o, gate/up as one (p["gate_up"] [E, 2F]), down."""

    def qkv(h):
        y = h @ p["qkv"]
        return y[:, : H * D], y[:, H * D : (H + KV) * D], y[:, (H + KV) * D :]

    def gate_up(h):
        y = h @ p["gate_up"]
        return y[:, :F], y[:, F:]

    return _decoder_layer(p, x, kc, vc, pos, qkv, gate_up)


def make_step(variant, n_layers):
    def step(params, caches, tok, pos):
        x = jnp.take(params["embed"], tok, axis=0)
        if variant in ("unrolled", "fused"):
            one = fused_layer if variant == "fused" else layer
            new = []
            for i in range(n_layers):
                x, kc, vc = one(params["layers"][i], x, *caches[i], pos)
                new.append((kc, vc))
            caches = new
        else:
            def body(carry, i):
                x, (kc, vc) = carry
                p = jax.tree.map(lambda w: w[i], params["layers"])
                x, k1, v1 = layer(p, x, kc[i], vc[i], pos)
                kc = jax.lax.dynamic_update_index_in_dim(kc, k1, i, 0)
                vc = jax.lax.dynamic_update_index_in_dim(vc, v1, i, 0)
                return (x, (kc, vc)), None

            (x, caches), _ = jax.lax.scan(body, (x, caches), jnp.arange(n_layers))
        logits = rms(x, params["norm"]) @ params["head"]
        return caches, jnp.argmax(logits, -1).astype(jnp.int32)

    def loop(params, caches, tok, steps):
        def cond(c):
            return c[0] < steps

        def body(c):
            i, caches, tok = c
            caches, tok = step(params, caches, tok, i)
            return i + 1, caches, tok

        _, caches, tok = jax.lax.while_loop(cond, body, (jnp.int32(0), caches, tok))
        return caches, tok

    return jax.jit(loop, donate_argnums=(1,))


def init(variant, n_layers, batch):
    key = jax.random.key(0)

    def rnd(shape):
        nonlocal key
        key, sub = jax.random.split(key)
        return (0.02 * jax.random.normal(sub, shape, jnp.float32)).astype(jnp.bfloat16)

    if variant in ("unrolled", "fused"):
        shapes = layer_shapes()
        if variant == "fused":
            shapes = dict(ln1=(E,), qkv=(E, (H + 2 * KV) * D), o=(H * D, E), ln2=(E,), gate_up=(E, 2 * F), down=(F, E))
        layers = [{n: rnd(s) for n, s in shapes.items()} for _ in range(n_layers)]
        caches = [tuple(jnp.zeros((batch, CTX, KV, D), jnp.bfloat16) for _ in range(2)) for _ in range(n_layers)]
    else:
        layers = {n: rnd((n_layers,) + s) for n, s in layer_shapes().items()}
        caches = tuple(jnp.zeros((n_layers, batch, CTX, KV, D), jnp.bfloat16) for _ in range(2))
    params = dict(embed=rnd((V, E)), layers=layers, norm=rnd((E,)), head=rnd((E, V)))
    return params, caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["unrolled", "scan", "fused"], required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--dump", default=None, help="write the optimized HLO here")
    args = ap.parse_args()
    for batch in args.batch:
        params, caches = init(args.variant, args.layers, batch)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params["embed"].nbytes
        fn = make_step(args.variant, args.layers)
        tok = jnp.zeros((batch,), jnp.int32)
        t0 = time.perf_counter()
        compiled = fn.lower(params, caches, tok, args.steps).compile()
        compile_s = time.perf_counter() - t0
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{args.variant}_b{batch}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
        caches, tok = compiled(params, caches, tok, args.steps)
        tok.block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            caches, tok = compiled(params, caches, tok, args.steps)
            tok.block_until_ready()
            times.append((time.perf_counter() - t0) / args.steps)
        ms = 1e3 * float(np.median(times))
        print(json.dumps(dict(variant=args.variant, xla_flags=os.environ.get("XLA_FLAGS", ""), batch=batch,
                              layers=args.layers, compile_s=round(compile_s, 2), ms_per_step=round(ms, 3),
                              weight_gb_s=round(weight_bytes / ms / 1e6, 1))), flush=True)
        del params, caches, compiled


if __name__ == "__main__":
    main()
