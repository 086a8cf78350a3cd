"""The LLM API: input forms, RequestOutput fields, batching past max_batch_size, lifecycle, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import jaxllm
from jaxllm import LLM, CompletionOutput, RequestOutput, SamplingParams

PROMPTS = ["The capital of France is", "Hello, my name is", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@pytest.fixture(scope="module")
def alone(tiny_llm):
    """Each prompt's greedy tokens, generated alone."""
    return {p: tiny_llm.generate(p, GREEDY, use_tqdm=False).outputs[0].token_ids for p in PROMPTS}


# -- input forms ---------------------------------------------------------------------------------
def test_str_gives_one_request_output(tiny_llm, alone):
    out = tiny_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert out.prompt == PROMPTS[0]
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(PROMPTS[0])
    assert out.finished is True
    assert len(out.outputs) == 1
    c = out.outputs[0]
    assert isinstance(c, CompletionOutput)
    assert c.index == 0
    assert c.token_ids == alone[PROMPTS[0]]
    assert len(c.token_ids) == 8 and c.finish_reason == "length"
    assert isinstance(c.text, str) and c.text


def test_list_of_str_gives_list(tiny_llm, alone):
    outs = tiny_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert isinstance(outs, list) and len(outs) == len(PROMPTS)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outs] == [alone[p] for p in PROMPTS]
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    assert all(o.finished and o.outputs[0].index == 0 for o in outs)
    # a one-element list still gives a list
    one = tiny_llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)
    assert isinstance(one, list) and len(one) == 1
    assert one[0].outputs[0].token_ids == alone[PROMPTS[1]]


def test_token_ids_gives_one_request_output(tiny_llm, alone):
    ids = tiny_llm.tokenizer.encode(PROMPTS[0])
    out = tiny_llm.generate(ids, GREEDY, use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert out.prompt is None
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == alone[PROMPTS[0]]


def test_dict_inputs(tiny_llm, alone):
    out = tiny_llm.generate({"prompt": PROMPTS[1]}, GREEDY, use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert out.prompt == PROMPTS[1]
    assert out.outputs[0].token_ids == alone[PROMPTS[1]]

    ids = tiny_llm.tokenizer.encode(PROMPTS[2])
    out = tiny_llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert out.prompt is None
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == alone[PROMPTS[2]]


def test_mixed_list(tiny_llm, alone):
    tok = tiny_llm.tokenizer
    inputs = [
        PROMPTS[0],
        tok.encode(PROMPTS[1]),
        {"prompt": PROMPTS[2]},
        {"prompt_token_ids": tok.encode(PROMPTS[0])},
    ]
    outs = tiny_llm.generate(inputs, GREEDY, use_tqdm=False)
    assert len(outs) == 4
    assert [o.prompt for o in outs] == [PROMPTS[0], None, PROMPTS[2], None]
    assert [o.prompt_token_ids for o in outs] == [tok.encode(p) for p in (PROMPTS + PROMPTS[:1])]
    assert [o.outputs[0].token_ids for o in outs] == [alone[p] for p in PROMPTS + PROMPTS[:1]]
    assert len({o.request_id for o in outs}) == 4


def test_one_sampling_params_per_prompt(tiny_llm, alone):
    sps = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (3, 8, 5)]
    outs = tiny_llm.generate(PROMPTS, sps, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 8, 5]
    for p, m, o in zip(PROMPTS, (3, 8, 5), outs):
        assert o.outputs[0].token_ids == alone[p][:m]
        assert o.outputs[0].finish_reason == "length"


def test_request_ids_distinct_across_calls(tiny_llm):
    a = tiny_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=1), use_tqdm=False)
    b = tiny_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=1), use_tqdm=False)
    ids = [o.request_id for o in a + b]
    assert len(set(ids)) == 4


def test_default_sampling_params_and_tqdm(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0])  # defaults: greedy SamplingParams(), progress bar on
    assert out.finished
    assert 1 <= len(out.outputs[0].token_ids) <= SamplingParams().max_tokens


def test_more_prompts_than_max_batch_size(tiny_llm):
    assert tiny_llm.max_batch_size == 8
    base = ["The capital of France is", "Hello, my name is", "def fibonacci(n):", "A", "Once upon a time"]
    prompts = [f"{p} {i}" for i, p in enumerate(base * 2)]  # 10 distinct prompts of different lengths
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = tiny_llm.generate(prompts, sp, use_tqdm=False)
    assert len(outs) == 10
    assert [o.prompt for o in outs] == prompts
    assert len({o.request_id for o in outs}) == 10
    for p, o in zip(prompts, outs):
        single = tiny_llm.generate(p, sp, use_tqdm=False)
        assert o.outputs[0].token_ids == single.outputs[0].token_ids, p
        assert o.outputs[0].text == single.outputs[0].text, p
        assert o.finished and len(o.outputs[0].token_ids) == 6


# -- lifecycle -----------------------------------------------------------------------------------
def test_context_manager_and_shutdown(tiny_checkpoints):
    with LLM(str(tiny_checkpoints["llama_tied"]), max_seq_len=64, max_batch_size=2) as llm:
        out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("Hello", use_tqdm=False)
    llm.shutdown()  # a second shutdown is fine
    llm.shutdown()
    with pytest.raises(RuntimeError):
        llm.generate("Hello", use_tqdm=False)


def test_exit_without_shutdown(tiny_checkpoints):
    script = textwrap.dedent(
        """
        import sys
        from jaxllm import LLM, SamplingParams
        llm = LLM(sys.argv[1], max_seq_len=64, max_batch_size=2)
        out = llm.generate("Hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        print("TOKENS", len(out.outputs[0].token_ids))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tiny_checkpoints["llama_tied"])],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOKENS 4" in r.stdout


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_version():
    r = subprocess.run(
        [sys.executable, "-m", "jaxllm", "--version"], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == jaxllm.__version__


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_llm):
    from jaxllm import SamplingParams

    ids = list(range(100, 140))
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    cut = tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, ignore_eos=True, truncate_prompt_tokens=10), use_tqdm=False)
    ref = tiny_llm.generate({"prompt_token_ids": ids[-10:]}, sp, use_tqdm=False)
    full = tiny_llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
    assert cut.prompt_token_ids == ids[-10:]
    assert cut.outputs[0].token_ids == ref.outputs[0].token_ids
    assert full.prompt_token_ids == ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be >= 1"):
        SamplingParams(truncate_prompt_tokens=0)


def test_add_special_tokens(tiny_checkpoints):
    """A tokenizer that adds BOS: text prompts get it by default, not with add_special_tokens=False."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from jaxllm import LLM

    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoints["llama3"]))
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    plain = tok.encode("Hello world", add_special_tokens=False)
    with LLM(str(tiny_checkpoints["llama3"]), tokenizer=tok, max_seq_len=64) as llm:
        with_bos = llm.generate("Hello world", SamplingParams(max_tokens=1), use_tqdm=False)
        without = llm.generate("Hello world", SamplingParams(max_tokens=1, add_special_tokens=False), use_tqdm=False)
    assert with_bos.prompt_token_ids == [bos] + plain
    assert without.prompt_token_ids == plain
    with pytest.raises(TypeError, match="add_special_tokens must be a bool"):
        SamplingParams(add_special_tokens="no")


def test_spaces_between_special_tokens(tiny_llm):
    """Kept special tokens are spaced from their neighbours by default, glued with False; the
    incremental detokenizer builds the same text as one decode of all tokens."""
    import numpy as np

    from jaxllm.engine.detokenizer import IncrementalDetokenizer, decode_text

    tok = tiny_llm.tokenizer
    eos = tok.eos_token_id
    hello, world = tok.encode("Hello", add_special_tokens=False), tok.encode(" world", add_special_tokens=False)
    ids = hello + [eos] + world + [eos]
    special = tok.decode([eos])
    assert decode_text(tok, ids, False, True) == f"Hello {special}  world {special}"
    assert decode_text(tok, ids, False, False) == f"Hello{special} world{special}"
    assert decode_text(tok, ids, True, True) == "Hello world"
    for spaces in (True, False):
        d = IncrementalDetokenizer(tok, [5, 6], False, spaces)
        assert "".join(d.add(t) for t in ids) == decode_text(tok, ids, False, spaces)
    forced = np.array(ids)

    def force(out_ids, logits):
        logits = np.full_like(logits, -np.inf)
        logits[forced[len(out_ids)]] = 0.0
        return logits

    sp = dict(max_tokens=len(ids), ignore_eos=True, skip_special_tokens=False, logits_processor=force)
    out = tiny_llm.generate("x", SamplingParams(**sp), use_tqdm=False).outputs[0]
    assert out.token_ids == ids and out.text == decode_text(tok, ids, False, True)
    out = tiny_llm.generate("x", SamplingParams(spaces_between_special_tokens=False, **sp), use_tqdm=False).outputs[0]
    assert out.text == decode_text(tok, ids, False, False)
