"""Repetition (transformers' definition) and presence / frequency (OpenAI's) penalties."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import SamplingParams

PROMPTS = ["The capital of France is", "1, 2, 3, 1, 2, 3, 1, 2,"]


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama3"]), dtype=torch.float32).eval()


def test_repetition_penalty_matches_transformers(tiny_llm, hf_model):
    import torch

    sp = SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    outs = tiny_llm.generate(PROMPTS, sp, use_tqdm=False)
    plain = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert any(o.outputs[0].token_ids != p.outputs[0].token_ids for o, p in zip(outs, plain)), "penalty had no effect"
    for out in outs:
        ids = out.prompt_token_ids
        with torch.no_grad():
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                repetition_penalty=1.3, pad_token_id=0,
            )
        assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()


def test_presence_and_frequency_penalties_follow_openai(tiny_llm, hf_model):
    import torch

    presence, frequency = 0.8, 0.6
    sp = SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency)
    outs = tiny_llm.generate(PROMPTS, sp, use_tqdm=False)
    plain = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert any(o.outputs[0].token_ids != p.outputs[0].token_ids for o, p in zip(outs, plain)), "penalties had no effect"
    for out in outs:
        ids = list(out.prompt_token_ids)
        generated = []
        for _ in range(20):  # greedy on logits - presence * [count > 0] - frequency * count
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids + generated])).logits[0, -1].numpy().astype(np.float64)
            counts = np.bincount(generated, minlength=logits.shape[0])[: logits.shape[0]]
            generated.append(int(np.argmax(logits - presence * (counts > 0) - frequency * counts)))
        assert out.outputs[0].token_ids == generated


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    ],
)
def test_penalties_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
