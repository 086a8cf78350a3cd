"""Logprobs of generated tokens against transformers' log_softmax (float32, tiny model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxllm import SamplingParams


def _hf_logprobs(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1).numpy()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_match_transformers(tiny_llm, tiny_checkpoints, temperature):
    k = 5
    out = tiny_llm.generate(
        "The capital of France is",
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=k, temperature=temperature, seed=3),
        use_tqdm=False,
    )
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 12
    ref = _hf_logprobs(tiny_checkpoints["llama3"], out.prompt_token_ids + comp.token_ids)
    p = len(out.prompt_token_ids)
    for i, (tid, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[p - 1 + i]  # the distribution that chose token i
        order = np.argsort(-row)
        assert abs(entry[tid].logprob - row[tid]) < 1e-4
        assert entry[tid].rank == 1 + int(np.sum(row > row[tid]))
        top = sorted((t for t in entry if entry[t].rank <= k), key=lambda t: entry[t].rank)
        assert top == order[:k].tolist() and [entry[t].rank for t in top] == list(range(1, k + 1))
        for t in order[:k]:
            assert abs(entry[int(t)].logprob - row[t]) < 1e-4
            assert entry[int(t)].decoded_token == tiny_llm.tokenizer.decode([int(t)])
        if temperature == 0:
            assert entry[tid].rank == 1
    assert math.isclose(comp.cumulative_logprob, sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)), rel_tol=1e-5)


def test_logprobs_zero_reports_only_the_chosen_token(tiny_llm):
    out = tiny_llm.generate("Hello", SamplingParams(max_tokens=6, logprobs=0, ignore_eos=True), use_tqdm=False)
    comp = out.outputs[0]
    assert [list(e) for e in comp.logprobs] == [[t] for t in comp.token_ids]
    plain = tiny_llm.generate("Hello", SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert plain.outputs[0].logprobs is None
    assert plain.outputs[0].token_ids == comp.token_ids
