"""bad / bad_token_ids: banned tokens and token sequences never appear; greedy outputs equal
transformers' generate with the same bad_words_ids (its NoBadWordsLogitsProcessor)."""

from __future__ import annotations

import pytest

from jaxllm import SamplingParams

PROMPT = [5, 6, 7, 8]


def _greedy(llm, **kw):
    sp = SamplingParams(max_tokens=14, ignore_eos=True, **kw)
    return llm.generate({"prompt_token_ids": PROMPT}, sp, use_tqdm=False).outputs[0].token_ids


def _hf_greedy(path, bad_words_ids, n=14):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          bad_words_ids=bad_words_ids, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def test_bad_token_ids_and_words_match_transformers(tiny_llm, tiny_checkpoints):
    base = _greedy(tiny_llm)
    assert base == _hf_greedy(tiny_checkpoints["llama3"], None)
    banned = base[3]
    pair = base[1:3]  # a two-token sequence the model produces unbanned
    word = tiny_llm.tokenizer.decode(pair)
    seqs = tiny_llm._bad_words(SamplingParams(bad=[word]))[1]
    assert pair in seqs, "the bad word tokenizes back to the pair"
    got = _greedy(tiny_llm, bad_token_ids=[banned], bad=[word])
    assert banned not in got
    assert all(got[i : i + 2] != pair for i in range(len(got) - 1))
    assert got != base
    ids, seqs = tiny_llm._bad_words(SamplingParams(bad_token_ids=[banned], bad=[word]))
    assert got == _hf_greedy(tiny_checkpoints["llama3"], [[t] for t in ids] + seqs)


def test_one_token_bad_word_is_a_banned_token(tiny_llm):
    base = _greedy(tiny_llm)
    word = tiny_llm.tokenizer.decode([base[0]])
    ids, seqs = tiny_llm._bad_words(SamplingParams(bad=word))
    assert base[0] in ids
    assert base[0] not in _greedy(tiny_llm, bad=word)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(bad=""), ValueError, "bad must not contain an empty"),
    (dict(bad=["ok", "  "]), ValueError, "bad must not contain an empty"),
    (dict(bad=[3]), TypeError, "bad must be a str or a list of str"),
    (dict(bad_token_ids=[-1]), ValueError, "bad_token_ids"),
    (dict(bad_token_ids=7), TypeError, "bad_token_ids must be a list of int"),
])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SamplingParams(**kw)


def test_bad_token_ids_out_of_vocab(tiny_llm):
    v = tiny_llm.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"bad_token_ids must be ints in \[0, {v}\), got {v}"):
        tiny_llm.generate("hi", SamplingParams(bad_token_ids=[v]), use_tqdm=False)
