"""Bad inputs fail early, with ValueError / TypeError naming the argument, before any work starts."""

from __future__ import annotations

import pytest

from jaxllm import LLM, SamplingParams


@pytest.fixture
def no_run(tiny_llm, monkeypatch):
    """Make submission to the engine fail: a generate call that got as far as submitting shows."""

    def run(*a, **k):
        raise AssertionError("the engine ran: validation did not happen before generation")

    monkeypatch.setattr(tiny_llm._engine, "add_request", run)
    return tiny_llm


# -- SamplingParams ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(max_tokens=0), ValueError, "max_tokens"),
        (dict(max_tokens=-3), ValueError, "max_tokens"),
        (dict(max_tokens=None), TypeError, "max_tokens"),
        (dict(max_tokens=4, min_tokens=5), ValueError, "min_tokens"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(top_p=0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=1.1), ValueError, "min_p"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(stop=[""]), ValueError, "stop"),
        (dict(stop=""), ValueError, "stop"),
        (dict(stop=[1]), TypeError, "stop"),
        (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"),
        (dict(stop_token_ids=5), TypeError, "stop_token_ids"),
        (dict(n=2), ValueError, "n and best_of must be 1 with greedy decoding"),
        (dict(n=0), ValueError, "n must be"),
        (dict(best_of=3), ValueError, "n and best_of must be 1 with greedy decoding"),
        (dict(n=3, best_of=2, temperature=1.0), ValueError, r"best_of must be >= n \(3\), got 2"),
        (dict(best_of=0), ValueError, "best_of must be"),
        (dict(n=65, temperature=1.0), ValueError, "must be <= 64"),
        (dict(logprobs=21), ValueError, r"logprobs must be in \[0, 20\]"),
        (dict(logprobs=-1), ValueError, "logprobs must be >= 0"),
        (dict(prompt_logprobs=21), ValueError, r"prompt_logprobs must be in \[0, 20\]"),
        (dict(prompt_logprobs=-1), ValueError, "prompt_logprobs must be >= 0"),
    ],
)
def test_bad_sampling_params(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SamplingParams(**kwargs)


def test_good_sampling_params_edges():
    # the edges of every range are accepted
    SamplingParams(max_tokens=1, min_tokens=1, temperature=0, top_p=1.0, top_k=0, min_p=0.0)
    SamplingParams(top_p=1e-6, min_p=1.0, seed=0, stop="x", stop_token_ids=[0])


# -- LLM.generate: every request is checked before any is generated ------------------------------
def _vocab(llm):
    return llm.model_config.vocab_size


@pytest.mark.parametrize(
    "make_input, name",
    [
        (lambda v: "", "prompt"),
        (lambda v: {"prompt": ""}, "prompt"),
        (lambda v: [], "inputs"),
        (lambda v: [[]], "prompt_token_ids"),
        (lambda v: {"prompt_token_ids": []}, "prompt_token_ids"),
        (lambda v: [1, 2, v], "prompt_token_ids"),
        (lambda v: [1, -1, 2], "prompt_token_ids"),
        (lambda v: {"prompt_token_ids": [v + 5]}, "prompt_token_ids"),
        (lambda v: {"text": "hi"}, "prompt"),
    ],
)
def test_bad_prompt(no_run, make_input, name):
    with pytest.raises(ValueError, match=name):
        no_run.generate(make_input(_vocab(no_run)), SamplingParams(max_tokens=4), use_tqdm=False)


def test_bad_prompt_type(no_run):
    with pytest.raises(TypeError, match="inputs"):
        no_run.generate(42, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt"):
        no_run.generate(["ok", 3.5], use_tqdm=False)


def test_mixed_good_and_bad_prompts_generate_nothing(no_run):
    v = _vocab(no_run)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        no_run.generate(["A good prompt", [5, v]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        no_run.generate([[5, 6, 7], ""], SamplingParams(max_tokens=4), use_tqdm=False)
    # a bad per-request setting in second place
    sps = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, stop_token_ids=[v])]
    with pytest.raises(ValueError, match="stop_token_ids"):
        no_run.generate(["one", "two"], sps, use_tqdm=False)


def test_stop_token_ids_and_end_id_outside_vocab(no_run):
    v = _vocab(no_run)
    with pytest.raises(ValueError, match="stop_token_ids"):
        no_run.generate("hi", SamplingParams(stop_token_ids=[v]), use_tqdm=False)
    with pytest.raises(ValueError, match="end_id"):
        no_run.generate("hi", SamplingParams(end_id=v), use_tqdm=False)


def test_sampling_params_wrong_length_or_type(no_run):
    with pytest.raises(ValueError, match="sampling_params"):
        no_run.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params"):
        no_run.generate("a", [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        no_run.generate(["a", "b"], [SamplingParams(), {"max_tokens": 3}], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        no_run.generate("a", {"max_tokens": 3}, use_tqdm=False)


def test_prompt_plus_max_tokens_over_max_seq_len(no_run):
    assert no_run.max_seq_len == 256
    with pytest.raises(ValueError, match="max_seq_len"):
        no_run.generate([7] * 250, SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        no_run.generate([[7] * 10, [7] * 247], SamplingParams(max_tokens=10), use_tqdm=False)


def test_prompt_plus_max_tokens_exactly_max_seq_len(tiny_llm):
    out = tiny_llm.generate([7] * 246, SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert out.finished
    assert len(out.prompt_token_ids) == 246
    assert len(out.outputs[0].token_ids) == 10
    assert out.outputs[0].finish_reason == "length"


# -- LLM(...) ------------------------------------------------------------------------------------
def test_missing_local_path():
    with pytest.raises(ValueError, match="model=.*/nonexistent/x"):
        LLM("/nonexistent/x")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment at import time: patch the values it already read
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        LLM("no-such-org/no-such-model")


def test_trust_remote_code(tiny_checkpoints):
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(str(tiny_checkpoints["llama_tied"]), trust_remote_code=True)


def test_unsupported_architecture(tmp_path):
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    tf.GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        LLM(str(tmp_path / "gpt2"))
    assert "LlamaForCausalLM" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(dtype="int8"), "dtype"),
        (dict(load_format="pt"), "load_format"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(decode_steps=0), "decode_steps"),
    ],
)
def test_bad_llm_arguments(tiny_checkpoints, kwargs, name):
    with pytest.raises(ValueError, match=name):
        LLM(str(tiny_checkpoints["llama_tied"]), **kwargs)


def test_max_seq_len_over_max_position_embeddings(tiny_checkpoints):
    with pytest.raises(ValueError, match="max_seq_len.*512"):
        LLM(str(tiny_checkpoints["llama_tied"]), max_seq_len=513)


def test_checkpoint_lacking_one_part_of_a_fused_projection(tiny_checkpoints, tmp_path):
    """k/v and gate/up are one parameter each (two HF tensors stacked): a checkpoint with only one
    of the two is refused, naming the parameter and the tensor that is there."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tiny_checkpoints["llama3"]
    shutil.copytree(src, tmp_path / "ckpt")
    name = "model.layers.0.mlp.up_proj.weight"
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    if index.exists():  # sharded: drop it from its file and from the index
        meta = json.loads(index.read_text())
        file = tmp_path / "ckpt" / meta["weight_map"].pop(name)
        index.write_text(json.dumps(meta))
    else:
        (file,) = (tmp_path / "ckpt").glob("*.safetensors")
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"only part\(s\) \[0\] of the fused parameter 'layers.0.mlp.gate_up'.*gate_proj"):
        LLM(str(tmp_path / "ckpt"), compilation_cache=False)
