"""LLM(model="org/name") through the HF hub cache, offline: a fake cache in tmp, a subprocess with HF_HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from jaxllm import LLM, SamplingParams

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "The capital of France is"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from jaxllm import LLM, SamplingParams

    repo_id, commit, prompt = sys.argv[1:4]
    # greedy and seeded sampling at temperature 1: the tied tiny model's greedy
    # output just repeats the last prompt token, the sampled one depends on the whole distribution.
    sps = [
        SamplingParams(max_tokens=8, ignore_eos=True),
        SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=0),
    ]
    result = {}
    for name, kwargs in (("main", {}), ("commit", {"revision": commit})):
        try:  # each case reports on its own: one failing does not hide the others
            llm = LLM(model=repo_id, max_seq_len=64, max_batch_size=2, **kwargs)
            result[name] = [o.outputs[0].token_ids for o in llm.generate([prompt] * 2, sps, use_tqdm=False)]
            llm.shutdown()
        except Exception as e:
            result[name] = f"{type(e).__name__}: {e}"
    try:
        LLM(model=repo_id, revision="no-such-branch")
        result["bad_revision"] = "no error"
    except Exception as e:
        result["bad_revision"] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def hub_run(tiny_checkpoints, tmp_path_factory):
    """Fake hub cache holding a copy of the tiny tied Llama; the subprocess's results."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    repo = hf_home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_checkpoints["llama_tied"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)

    env = dict(os.environ)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, REPO_ID, COMMIT, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def local_tokens(tiny_checkpoints):
    """[greedy, seeded sampled] tokens from LLM(<the local folder>), as the subprocess generates them."""
    sps = [
        SamplingParams(max_tokens=8, ignore_eos=True),
        SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=0),
    ]
    llm = LLM(str(tiny_checkpoints["llama_tied"]), max_seq_len=64, max_batch_size=2)
    try:
        return [o.outputs[0].token_ids for o in llm.generate([PROMPT] * 2, sps, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_hub_id_offline_matches_local_folder(hub_run, local_tokens):
    assert [len(t) for t in local_tokens] == [8, 8]
    assert hub_run["main"] == local_tokens


def test_hub_revision_commit_offline(hub_run, local_tokens):
    assert hub_run["commit"] == local_tokens


def test_hub_unknown_revision_offline(hub_run):
    assert hub_run["bad_revision"].startswith("ValueError: ")
    assert "no-such-branch" in hub_run["bad_revision"]
