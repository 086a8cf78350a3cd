"""The persistent compilation cache is on by default, in the directory the user names."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from jaxllm import LLM, SamplingParams
llm = LLM(sys.argv[1], max_seq_len=64, compilation_cache=sys.argv[2])
import jax
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny programs compile fast
llm.generate("Hello", SamplingParams(max_tokens=4), use_tqdm=False)
print(json.dumps(jax.config.jax_compilation_cache_dir))
"""


def test_compiled_programs_land_in_the_cache_dir(tiny_checkpoints, tmp_path):
    cache = tmp_path / "xla-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoints["llama_tied"]), str(cache)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == str(cache)
    assert any(cache.iterdir()), "no compiled program was written to the cache directory"
