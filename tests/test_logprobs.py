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


def _check_prompt_entries(plp, ids, ref, k, tokenizer):
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        row, entry, tid = ref[p - 1], plp[p], ids[p]
        assert abs(entry[tid].logprob - row[tid]) < 1e-4
        # rank: random prompt tokens sit deep in the tail, among near-ties: count within the tolerance
        lp = entry[tid].logprob
        assert 1 + int(np.sum(row > lp + 1e-4)) <= entry[tid].rank <= 1 + int(np.sum(row > lp - 1e-4))
        order = np.argsort(-row)[:k].tolist()
        top = sorted((t for t in entry if entry[t].rank <= k), key=lambda t: entry[t].rank)
        assert top == order
        for t in order:
            assert abs(entry[t].logprob - row[t]) < 1e-4
            assert entry[t].decoded_token == tokenizer.decode([t])
        assert len(entry) in (k, k + 1)  # the top k, and the prompt token itself when it is not among them


def test_prompt_logprobs_match_transformers_chunked_and_with_a_cached_prefix(tiny_checkpoints):
    from jaxllm import LLM

    ids = [int(t) for t in np.random.default_rng(4).integers(3, 2000, 45)]
    ref = _hf_logprobs(tiny_checkpoints["llama3"], ids)
    sp = SamplingParams(max_tokens=2, prompt_logprobs=3)
    # max_num_tokens=16: the 45-token prompt is prefilled in three chunks
    with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=128, max_num_tokens=16,
             kv_cache_config=__import__("jaxllm").KvCacheConfig(tokens_per_block=8)) as llm:
        first = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
        _check_prompt_entries(first.prompt_logprobs, ids, ref, 3, llm.tokenizer)
        # the prompt's blocks are now cached: a request without prompt logprobs reuses them, one with
        # them still gets every position
        hits = llm.get_stats()[-1]["prefix_cache_hit_tokens"]
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2), use_tqdm=False)
        assert llm.get_stats()[-1]["prefix_cache_hit_tokens"] > hits
        again = llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
        assert again.prompt_logprobs == first.prompt_logprobs
        zero = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        assert all(len(e) == 1 for e in zero.prompt_logprobs[1:])
        assert [e[t].logprob for e, t in zip(zero.prompt_logprobs[1:], ids[1:])] == pytest.approx(
            [e[t].logprob for e, t in zip(first.prompt_logprobs[1:], ids[1:])], abs=1e-6)
        plain = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
        assert plain.prompt_logprobs is None
