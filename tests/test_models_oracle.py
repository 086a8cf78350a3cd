"""Every supported architecture variant against transformers' PyTorch implementation (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import VARIANTS

PROMPTS = [
    "The capital of France is",
    "Hello, my name is",
    "In 1492, Columbus sailed across the Atlantic Ocean and",
    "def fibonacci(n):",
    "A",
]


def _hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_match_transformers(variant, tiny_checkpoints):
    import jax.numpy as jnp
    import torch

    from jaxllm import LLM, SamplingParams

    path = tiny_checkpoints[variant]
    hf = _hf_model(path)
    llm = LLM(str(path), dtype="float32", max_seq_len=128, max_batch_size=8)
    tok = llm.tokenizer

    # float32 logits over a full prompt
    ids = tok.encode(PROMPTS[2])
    _, logits = llm._engine.runner.hidden_states(jnp.asarray([ids], jnp.int32))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    rel = np.linalg.norm(np.asarray(logits) - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, f"{variant}: relative logits error {rel:.2e}"

    # 32 greedy tokens, prompts of different lengths batched together, vs transformers one by one
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        p = tok.encode(prompt)
        with torch.no_grad():
            gen = hf.generate(
                torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
            )
        expected = gen[0, len(p):].tolist()
        assert out.prompt_token_ids == p
        assert out.outputs[0].token_ids == expected, f"{variant}: {prompt!r}"
        assert out.outputs[0].finish_reason == "length"
    llm.shutdown()


def test_sharded_checkpoint_has_several_files(tiny_checkpoints):
    files = list(tiny_checkpoints["llama3"].glob("*.safetensors"))
    assert len(files) >= 2
    assert (tiny_checkpoints["llama3"] / "model.safetensors.index.json").exists()
