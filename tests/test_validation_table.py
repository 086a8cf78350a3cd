"""Every row of docs/validation.md: the call raises exactly the exception and message it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jaxllm import LLM, KvCacheConfig, SamplingParams

DOC = Path(__file__).resolve().parents[1] / "docs" / "validation.md"
ROW = re.compile(r"^\| `(?P<call>.+)` \| (?P<exc>\w+) \| (?P<msg>.+) \|$")
ROWS = [m.groupdict() for m in map(ROW.match, DOC.read_text().splitlines()) if m]


def test_the_table_is_complete():
    assert len(ROWS) >= 25
    assert len({r["call"] for r in ROWS}) == len(ROWS)


@pytest.fixture(scope="module")
def env(tiny_checkpoints):
    model = str(tiny_checkpoints["llama3"])
    llm = LLM(model, max_seq_len=256)
    yield dict(SamplingParams=SamplingParams, LLM=LLM, KvCacheConfig=KvCacheConfig, llm=llm, MODEL=model,
               VOCAB=llm.model_config.vocab_size, MAX_SEQ_LEN=llm.max_seq_len)
    llm.shutdown()


@pytest.mark.parametrize("row", ROWS, ids=[r["call"] for r in ROWS])
def test_row(env, row, monkeypatch):
    # a call that got past validation would reach the engine: make that fail loudly
    monkeypatch.setattr(env["llm"]._engine, "add_request", lambda *a, **k: pytest.fail("validation was skipped"))
    with pytest.raises(Exception) as info:
        eval(row["call"], dict(env))
    assert type(info.value).__name__ == row["exc"]
    assert str(info.value).splitlines()[0] == row["msg"]


def test_prompt_at_the_limit_is_accepted(env):
    llm = env["llm"]
    out = llm.generate([1] * (env["MAX_SEQ_LEN"] - 4), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
