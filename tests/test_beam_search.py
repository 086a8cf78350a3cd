"""Beam search (width 4) against transformers' generate(num_beams=4, do_sample=False): the same
sequences, with the same length_penalty and early_stopping, finishing by EOS or by length."""

from __future__ import annotations

import pytest

from jaxllm import SamplingParams

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama3"]), dtype=torch.float32).eval()


def _hf_beams(model, eos, n, max_tokens, length_penalty, early_stopping):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), num_beams=4, num_return_sequences=n, do_sample=False,
                             max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                             pad_token_id=0, eos_token_id=eos)
    seqs = [r[len(PROMPT):].tolist() for r in out]
    return [s[: s.index(eos) + 1] if eos is not None and eos in s else s for s in seqs]  # drop HF's padding


def _ours(llm, eos, n, max_tokens, length_penalty, early_stopping):
    sp = SamplingParams(use_beam_search=True, best_of=4, n=n, max_tokens=max_tokens, length_penalty=length_penalty,
                        early_stopping=early_stopping, ignore_eos=True, stop_token_ids=[eos] if eos is not None else None)
    return llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False)


def test_beam_search_matches_transformers(tiny_llm, hf_model):
    free = _ours(tiny_llm, None, 2, 10, 1.0, False)
    assert [c.token_ids for c in free.outputs] == _hf_beams(hf_model, None, 2, 10, 1.0, False)
    assert all(c.finish_reason == "length" for c in free.outputs)
    # EOS tokens the beams meet at different depths, so hypotheses finish early and compete
    best = free.outputs[0].token_ids
    stopped = 0
    for eos in (best[2], best[7]):
        for length_penalty, early_stopping in [(1.0, False), (0.0, False), (-1.0, True), (1.5, "never")]:
            out = _ours(tiny_llm, eos, 3, 12, length_penalty, early_stopping)
            assert [c.token_ids for c in out.outputs] == _hf_beams(hf_model, eos, 3, 12, length_penalty, early_stopping)
            for c in out.outputs:
                assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
                stopped += c.finish_reason == "stop"
    assert stopped > 0, "some hypothesis must have ended with the EOS for the test to mean anything"


def test_beam_search_async_and_outputs(tiny_llm):
    sp = SamplingParams(use_beam_search=True, n=3, max_tokens=6, ignore_eos=True)
    out = tiny_llm.generate_async({"prompt_token_ids": PROMPT}, sp).result(timeout=120)
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    scores = [c.cumulative_logprob for c in out.outputs]
    assert scores == sorted(scores, reverse=True)  # equal lengths: ranked by summed logprob
    assert out.outputs[0].text == tiny_llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=0.8), "use_beam_search needs temperature 0"),
    (dict(logprobs=2), "use_beam_search does not support logprobs"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or"),
    (dict(n=3, best_of=2), r"best_of must be >= n \(3\)"),
])
def test_beam_search_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(use_beam_search=True, **kw)
