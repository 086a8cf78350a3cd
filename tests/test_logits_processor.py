"""logits_processor: Python callables see every step's logits; the request otherwise behaves like
any other (same sampler and key, stop tokens, max_tokens, logprobs, streaming)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jaxllm import SamplingParams

PROMPT = {"prompt_token_ids": [5, 6, 7, 8]}


def test_identity_processor_changes_nothing(tiny_llm):
    seen = []

    def identity(output_ids, logits):
        seen.append((list(output_ids), logits.shape, logits.dtype))
        return logits

    for kw in (dict(), dict(temperature=0.9, top_k=40, seed=3)):
        sp = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2, **kw)
        plain = tiny_llm.generate(PROMPT, sp, use_tqdm=False).outputs[0]
        seen.clear()
        proc = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2,
                                                        logits_processor=identity, **kw), use_tqdm=False).outputs[0]
        assert proc.token_ids == plain.token_ids and proc.text == plain.text
        assert [e[t].logprob for e, t in zip(proc.logprobs, proc.token_ids)] == pytest.approx(
            [e[t].logprob for e, t in zip(plain.logprobs, plain.token_ids)], abs=1e-4)
        assert [s[0] for s in seen] == [proc.token_ids[:i] for i in range(8)]  # called once per step, in order
        assert seen[0][1] == (tiny_llm.model_config.vocab_size,) and seen[0][2] == np.float32


def test_processors_steer_and_stop(tiny_llm):
    forced = [100, 200, 300, 400]

    def force(prompt_ids, output_ids, logits):  # the three-argument form
        assert prompt_ids == PROMPT["prompt_token_ids"]
        out = np.full_like(logits, -np.inf)
        out[forced[len(output_ids) % 4]] = 0.0
        return out

    def ban_300(output_ids, logits):  # moves 300's logit to 301
        logits = logits.copy()
        if np.isfinite(logits[300]):
            logits[301], logits[300] = logits[300], -np.inf
        return logits

    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logits_processor=force),
                            use_tqdm=False).outputs[0]
    assert out.token_ids == [100, 200, 300, 400, 100, 200] and out.finish_reason == "length"
    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logits_processor=[force, ban_300]),
                            use_tqdm=False).outputs[0]
    assert out.token_ids == [100, 200, 301, 400, 100, 200]  # applied in order
    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=6, stop_token_ids=[300], logits_processor=force),
                            use_tqdm=False).outputs[0]
    assert out.token_ids == [100, 200, 300] and out.finish_reason == "stop" and out.stop_reason == 300


def test_processed_request_streams(tiny_llm):
    sp = SamplingParams(max_tokens=5, ignore_eos=True, logits_processor=lambda ids, lg: lg)

    async def run():
        toks = []
        async for o in tiny_llm.generate_async(PROMPT, sp, streaming=True):
            toks += o.outputs[0].token_ids_diff
        return toks, o

    toks, final = asyncio.run(run())
    assert final.finished and toks == final.outputs[0].token_ids and len(toks) == 5


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(logits_processor=3), TypeError, "logits_processor must be a callable"),
    (dict(logits_processor=[]), TypeError, "logits_processor must be a callable"),
    (dict(logits_processor=lambda i, l: l, n=2, temperature=1.0), ValueError, "one sequence per request"),
])
def test_bad_logits_processor(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SamplingParams(**kw)
