"""The Pallas Triton kernels lowered for CUDA at Llama-3.1-8B's shapes, on a machine without a GPU:
jax traces and lowers a Triton-backend pallas_call to Triton IR in Python (only compiling it to PTX
needs the GPU), so asking for a CUDA lowering with a stand-in compute capability (9.0, an H100)
catches what interpret mode cannot -- a lowering rule the kernel's ops have no form for (e.g. `%`
on a traced index mixing i32 and i1, which cost two device calls to find) -- before any device
time is spent. Skipped where this JAX keeps its GPU-info hook elsewhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

S = jax.ShapeDtypeStruct
FP8, BF16, F32 = jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32


# the models' one-row fp8 products: (K, N, act, out_act, partials)
GEMVS = {
    "gate/up (4 whole rows a program)": (4096, 28672, None, None, False),
    "gate/up -> silu(gate) * up": (4096, 28672, None, "silu_mul", False),
    "down, read plainly (narrow, split)": (14336, 4096, None, None, True),
    "down computing silu * up": (14336, 4096, "silu_mul", None, True),
    "q/k/v (narrow, split)": (4096, 6144, None, None, True),
    "o (narrow, split)": (4096, 4096, None, None, True),
    "an fp8 LM head": (4096, 128256, None, None, False),
}


@pytest.mark.parametrize("name", list(GEMVS))
def test_gemv_lowers_for_cuda_at_the_models_tilings(cuda_lowering, name):
    from jaxllm.pallas.gemv import gemv, gemv_tiling

    k, n, act, out_act, partials = GEMVS[name]
    tiling = gemv_tiling(1, k, n, 1, True, act, out_act)
    x = S((1, 2 * k if act else k), BF16)
    text = cuda_lowering(lambda x, w, s: gemv(x, w, s, k_minor=True, act=act, out_act=out_act, partials=partials,
                                              **tiling), x, S((n, k), FP8), S((n,), F32))
    assert "triton" in text


def test_gemv_add_norm_epilogue_lowers_for_cuda(cuda_lowering):
    from jaxllm.pallas.gemv import gemv, gemv_tiling

    tiling = gemv_tiling(1, 4096, 4096, 1, True)
    cuda_lowering(lambda x, w, s, r, nw: gemv(x, w, s, r, nw, k_minor=True, eps=1e-5, **tiling),
                  S((1, 4096), BF16), S((4096, 4096), FP8), S((4096,), F32), S((1, 4096), BF16), S((4096,), BF16))


@pytest.mark.parametrize("pool", [BF16, FP8])
def test_rope_kv_kernels_lower_for_cuda(cuda_lowering, pool):
    from jaxllm.pallas.rope_kv import gemv_rope_kv_write, rope_kv_write

    kvh, g, d, k = 8, 4, 128, 4096
    n = kvh * (g + 2) * d
    pools = (S((4096, kvh, d), pool), S((4096, kvh, d), pool))
    kw = dict(group=g, dtype=BF16, k_scale=0.5 if pool == FP8 else 1.0)
    cuda_lowering(lambda x, w, s, c, sn, sl, kp, vp: gemv_rope_kv_write(x, w, s, c, sn, sl, kp, vp, **kw),
                  S((1, k), BF16), S((n, k), FP8), S((n,), F32), S((1, d // 2), F32), S((1, d // 2), F32),
                  S((1,), jnp.int32), *pools)
    for splits, rows in ((2, 1), (1, 1024)):  # batch 1's split-K partials; a 1024-row FP8 product, scaled
        cuda_lowering(lambda p, c, sn, sl, kp, vp, rs, cs: rope_kv_write(p, c, sn, sl, kp, vp, rs, cs, **kw),
                      S((splits, rows, kvh, g + 2, d), F32), S((rows, d // 2), F32), S((rows, d // 2), F32),
                      S((rows,), jnp.int32), *pools, S((rows,), F32), S((kvh, g + 2, d), F32))


def test_add_rmsnorm_lowers_for_cuda(cuda_lowering):
    from jaxllm.pallas.add_norm import add_rmsnorm

    cuda_lowering(lambda x, y, w: add_rmsnorm(x, y, w, eps=1e-5), S((1, 4096), BF16), S((2, 1, 4096), F32),
                  S((4096,), BF16))
