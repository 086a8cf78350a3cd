"""JAXLLM_DECODE_LOOP: a decode call's steps in an early-exiting while loop or a loop of fixed trip
count (so XLA:GPU need not read the loop predicate on the host each step); by default (auto) the
fixed loop for calls of up to 256 rows on GPUs, the while loop otherwise. Both give the same tokens
and finish reasons: done rows are masked in the fixed loop's extra steps."""

from __future__ import annotations

import pytest

from jaxllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Hello, my name is", "A"]


def _run(path, monkeypatch, mode, params):
    monkeypatch.setenv("JAXLLM_DECODE_LOOP", mode)
    with LLM(str(path), max_seq_len=128, compilation_cache=False, dtype="float32", decode_steps=8) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        engine = llm._engine
        call = next(c for c in engine._warmup_calls(32, [True]) if c[0] == "decode")
        fn, args, kwargs = engine.runner._jit_call(*call)
        eqns = fn.trace(*args, **kwargs).jaxpr.eqns
        # the step loop: a while (its predicate's primitives and the lengths of the scans in its
        # body) or a scan (a fixed trip count: its length and its body's primitives)
        loops = {e.primitive.name: ({c.primitive.name for c in e.params["cond_jaxpr"].jaxpr.eqns},
                                    [c.params["length"] for c in e.params["body_jaxpr"].jaxpr.eqns
                                     if c.primitive.name == "scan"])
                 if e.primitive.name == "while" else (e.params["length"], {c.primitive.name
                                                                           for c in e.params["jaxpr"].jaxpr.eqns})
                 for e in eqns if e.primitive.name in ("while", "scan")}
        return [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in outs], loops


def test_fixed_and_while_loops_give_the_same_outputs(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["llama3"]
    first, _ = _run(path, monkeypatch, "while", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stop = first[2][0][0][5]  # the third prompt's sixth token: it ends that row mid-call
    # rows ending at different steps of an 8-step call: max_tokens 3 (first call), 11, a stop token
    params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=11, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop])]
    want, while_loops = _run(path, monkeypatch, "while", params)
    got, fixed_loops = _run(path, monkeypatch, "fixed", params)
    chunked, chunked_loops = _run(path, monkeypatch, "4", params)  # checked every 4 of the call's 8 steps
    assert got == want and chunked == want
    # a while loop whose body is a scan of 4 steps
    assert set(chunked_loops) == {"while"} and "reduce_and" in chunked_loops["while"][0]
    assert chunked_loops["while"][1] == [4] and while_loops["while"][1] == []
    assert [len(r[0][0]) for r in got[:2]] == [3, 11] and got[2][0][1] == "stop"
    assert len(got[2][0][0]) == first[2][0][0].index(stop) + 1
    # the while loop's predicate asks whether every row is done; the fixed loop is a scan of 8 steps
    assert set(while_loops) == {"while"} and "reduce_and" in while_loops["while"][0]
    assert set(fixed_loops) == {"scan"} and fixed_loops["scan"][0] == 8 and "cond" not in fixed_loops["scan"][1]


def test_decode_loop_switch_is_checked(monkeypatch):
    from jaxllm.runner.runner import FIXED_LOOP_MAX_ROWS, decode_loop_mode, fixed_loop_max_rows

    monkeypatch.delenv("JAXLLM_FIXED_LOOP_MAX_ROWS", raising=False)
    assert fixed_loop_max_rows() == FIXED_LOOP_MAX_ROWS
    monkeypatch.setenv("JAXLLM_FIXED_LOOP_MAX_ROWS", "1024")
    assert fixed_loop_max_rows() == 1024
    for bad in ("-1", "many", "2.5"):
        monkeypatch.setenv("JAXLLM_FIXED_LOOP_MAX_ROWS", bad)
        with pytest.raises(ValueError, match=f"JAXLLM_FIXED_LOOP_MAX_ROWS='{bad}': expected a whole number"):
            fixed_loop_max_rows()

    monkeypatch.delenv("JAXLLM_DECODE_LOOP", raising=False)
    assert decode_loop_mode() == "auto"  # ModelRunner.decode_check_every decides
    for value, want in (("auto", "auto"), ("while", 1), ("fixed", None), ("4", 4)):
        monkeypatch.setenv("JAXLLM_DECODE_LOOP", value)
        assert decode_loop_mode() == want
    for bad in ("unrolled", "skip", "3", "0", "-4"):
        monkeypatch.setenv("JAXLLM_DECODE_LOOP", bad)
        with pytest.raises(ValueError, match=f"JAXLLM_DECODE_LOOP='{bad}': expected auto, while, fixed or a power"):
            decode_loop_mode()


def test_a_fixed_loop_under_tensor_parallelism_records_collectives_in_command_buffers(monkeypatch):
    """JAXLLM_DECODE_LOOP=fixed on GPUs with a TensorParallel: the decode programs (not prefill's)
    compile with XLA's collectives in command buffers; nowhere else, and not over a user's own
    choice in XLA_FLAGS. The option names kinds this XLA knows (it compiles)."""
    import jax
    import jax.numpy as jnp

    from conftest import stand_in_mesh
    from jaxllm.runner.runner import DECODE_COMMAND_BUFFERS, decode_compiler_options

    def mesh(platform):
        return stand_in_mesh(2, platform)

    tp = object()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert decode_compiler_options(None, tp, mesh("gpu")) == {"xla_gpu_enable_command_buffer": DECODE_COMMAND_BUFFERS}
    assert "COLLECTIVES" in DECODE_COMMAND_BUFFERS.split(",")
    assert decode_compiler_options(1, tp, mesh("gpu")) is None  # the while loop
    assert decode_compiler_options(None, None, mesh("gpu")) is None  # one device: no collectives
    assert decode_compiler_options(None, tp, mesh("cpu")) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=+COLLECTIVES")
    assert decode_compiler_options(None, tp, mesh("gpu")) is None
    f = jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_enable_command_buffer": DECODE_COMMAND_BUFFERS})
    assert float(f(jnp.float32(1))) == 2.0


def test_auto_runs_a_fixed_loop_for_up_to_256_rows_on_gpus_only(monkeypatch):
    """JAXLLM_DECODE_LOOP=auto: a fixed loop (None) for decode calls of at most FIXED_LOOP_MAX_ROWS
    rows on GPUs, each step checked (1) above it, for a tail call (every row ends within it by
    max_tokens) and on other platforms; an explicit mode holds for every call. Each loop kind is
    its own jitted program (decode_compiler_options differ), made once."""
    from types import SimpleNamespace

    from conftest import stand_in_mesh
    from jaxllm.runner.runner import FIXED_LOOP_MAX_ROWS, ModelRunner

    assert FIXED_LOOP_MAX_ROWS == 256

    def every(mode, on_gpu, rows, tail=False, max_rows=FIXED_LOOP_MAX_ROWS):
        runner = SimpleNamespace(_loop_mode=mode, _on_gpu=on_gpu, _fixed_max_rows=max_rows)
        return ModelRunner.decode_check_every(runner, rows, tail)

    assert [every("auto", True, r) for r in (1, 64, 256, 512, 1024)] == [None, None, None, 1, 1]
    assert [every("auto", True, r, tail=True) for r in (1, 256)] == [1, 1]
    assert [every("auto", False, r) for r in (1, 256, 1024)] == [1, 1, 1]
    assert [every(None, False, r, tail) for r in (1, 1024) for tail in (False, True)] == [None] * 4
    assert [every(4, True, r) for r in (1, 1024)] == [4, 4]
    assert [every("auto", True, r, max_rows=1024) for r in (512, 1024, 2048)] == [None, None, 1]
    assert every("auto", True, 1, max_rows=0) == 1
    runner = SimpleNamespace(mesh=stand_in_mesh(2, "gpu"), _decodes={}, _tensor_parallel=object(),
                             _decode_impl=lambda *a, **k: None)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    fixed, each = ModelRunner._decode_for(runner, None), ModelRunner._decode_for(runner, 1)
    assert fixed is ModelRunner._decode_for(runner, None) and fixed is not each
    assert set(runner._decodes) == {None, 1}


TP_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
from jaxllm import LLM, SamplingParams

prompts = ["The capital of France is", "Hello, my name is", "A"]
params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 21, 30)]
out, loops = {}, {}
for tp, gpu_policy in ((1, False), (2, True)):
    with LLM(sys.argv[1], tensor_parallel_size=tp, max_seq_len=128, compilation_cache=False, dtype="float32",
             decode_steps=8) as llm:
        runner = llm._engine.runner
        runner._on_gpu = gpu_policy  # the GPU default: fixed loops up to 256 rows, chained; tails on the while loop
        seen = []
        decode_call = runner.decode_call
        runner.decode_call = lambda *a, **k: (lambda c: seen.append(c[1]["check_every"]) or c)(decode_call(*a, **k))
        out[tp] = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
        loops[tp] = seen
print(json.dumps({"same": out[1] == out[2], "lengths": [len(t) for t in out[2]], "loops": loops}))
"""


def test_tensor_parallel_decode_under_the_gpu_loop_policy_matches_one_device(tiny_checkpoints, tmp_path):
    """tp=2 (2 virtual CPU devices) with the GPU's default decode policy stood in for -- fixed loops,
    chained, tail calls on the while loop -- gives tp=1's greedy tokens (float32, while loops)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "tp_loops.py"
    script.write_text(TP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tiny_checkpoints["llama3"])], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["same"] and res["lengths"] == [3, 21, 30]
    assert set(res["loops"]["1"]) == {1} and None in res["loops"]["2"] and 1 in res["loops"]["2"], res["loops"]
