"""n and best_of: several sequences per request, reproducible per seed, merged into one output."""

from __future__ import annotations

import asyncio

import pytest

from jaxllm import SamplingParams

PROMPT = {"prompt_token_ids": [5, 6, 7, 8, 9]}


def _seqs(out):
    return [c.token_ids for c in out.outputs]


def test_n_seeded_is_reproducible_and_batch_invariant(tiny_llm):
    sp = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate(PROMPT, sp, use_tqdm=False)
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    assert alone.finished and all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in alone.outputs)
    assert len({tuple(s) for s in _seqs(alone)}) == 4, "four samples of a 10-token continuation all differ"
    assert _seqs(tiny_llm.generate(PROMPT, sp, use_tqdm=False)) == _seqs(alone)
    others = [{"prompt_token_ids": [9, 8, 7]}, {"prompt_token_ids": [3] * 30}]
    crowd = tiny_llm.generate(
        [others[0], PROMPT, others[1]],
        [SamplingParams(temperature=0.7, max_tokens=6), sp, SamplingParams(n=2, temperature=1.0, max_tokens=12)],
        use_tqdm=False,
    )
    assert _seqs(crowd[1]) == _seqs(alone)
    assert len(crowd[2].outputs) == 2
    # sequence 0 of a seeded request is what n=1 with that seed gives
    one = tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)
    assert one.outputs[0].token_ids == alone.outputs[0].token_ids


def test_best_of_returns_the_n_most_likely(tiny_llm):
    every = tiny_llm.generate(PROMPT, SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)
    best = tiny_llm.generate(PROMPT, SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=8),
                             use_tqdm=False)
    ranked = sorted(every.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [(c.index, c.token_ids) for c in best.outputs] == [(c.index, c.token_ids) for c in ranked]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_n_streams_and_aborts(tiny_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)

    async def stream():
        texts, tokens, last = {}, {}, None
        async for out in tiny_llm.generate_async(PROMPT, sp, streaming=True):
            for c in out.outputs:
                texts[c.index] = texts.get(c.index, "") + c.text_diff
                tokens[c.index] = tokens.get(c.index, []) + c.token_ids_diff
            last = out
        return texts, tokens, last

    texts, tokens, final = asyncio.run(stream())
    assert final.finished and len(final.outputs) == 3
    for c in final.outputs:
        assert tokens[c.index] == c.token_ids and texts[c.index] == c.text
    assert _seqs(final) == _seqs(tiny_llm.generate(PROMPT, sp, use_tqdm=False))

    handle = tiny_llm.generate_async(PROMPT, SamplingParams(n=2, temperature=1.0, max_tokens=200, ignore_eos=True))
    handle.abort()
    out = handle.result(timeout=60)
    assert out.finished and len(out.outputs) == 2
    assert all(c.finish_reason in ("cancelled", "length") for c in out.outputs)
    assert any(c.finish_reason == "cancelled" for c in out.outputs)


@pytest.mark.parametrize("bad", [dict(n=2, temperature=0), dict(n=2, best_of=1, temperature=1.0)])
def test_bad_n_best_of(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
