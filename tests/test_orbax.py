"""LLM.save writes an Orbax checkpoint that LLM(model=path) restores with identical outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Hello, my name is", "A"]


def test_orbax_round_trip_gives_identical_outputs(tiny_llm, tmp_path):
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in tiny_llm.generate(PROMPTS, sp, use_tqdm=False)]
    path = tmp_path / "ckpt"
    tiny_llm.save(path)
    assert (path / "jaxllm.json").exists() and (path / "params").is_dir() and (path / "config.json").exists()
    assert not list(path.glob("*.safetensors")), "the checkpoint holds converted parameters, not HF weights"
    with LLM(str(path), max_seq_len=256) as restored:
        after = [o.outputs[0].token_ids for o in restored.generate(PROMPTS, sp, use_tqdm=False)]
        assert restored.dtype == tiny_llm.dtype
        for (p1, v1), (p2, v2) in zip(
            _flat(tiny_llm._engine.runner.params), _flat(restored._engine.runner.params)
        ):
            assert p1 == p2
            np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    assert after == before
    # saves of the formats before the fused k/v took its layout are refused with the way out; so is an unknown format
    marker = path / "jaxllm.json"
    meta = json.loads(marker.read_text())
    assert meta["format_version"] == 4
    for version in (1, 2, 3):
        marker.write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(ValueError, match=rf"format {version}, saved before the fused k/v .*save it again"):
            LLM(str(path), max_seq_len=256)
    marker.write_text(json.dumps({**meta, "format_version": 5}))
    with pytest.raises(ValueError, match=r"format 5; this jaxllm reads formats \[4\]"):
        LLM(str(path), max_seq_len=256)


def test_save_refuses_a_non_empty_folder(tiny_llm, tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        tiny_llm.save(tmp_path)


def _flat(state):
    from flax import nnx

    return [(p, v.get_value()) for p, v in nnx.to_flat_state(state)]
