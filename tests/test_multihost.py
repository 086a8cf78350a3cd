"""Several hosts on one machine: two processes joined by jax.distributed (gloo on CPU), each with
2 devices, one model tensor-parallel over all 4. Process 0 takes the requests; process 1 makes
the same device calls (see jaxllm/runner/multihost.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm import SamplingParams

WORKER = Path(__file__).with_name("multihost_worker.py")
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(10, 50))}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model, mode):
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    return [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(model), mode], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs, timeout):
    outs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process hung")
        outs.append(out)
    return outs


def test_two_processes_tensor_parallel_over_both(tiny_checkpoints, tiny_llm):
    procs = _launch(tiny_checkpoints["llama3"], "generate")
    out0, out1 = _finish(procs, 240)
    assert procs[0].returncode == 0, out0[-3000:]
    assert procs[1].returncode == 0, out1[-3000:]
    got = json.loads(next(line for line in out0.splitlines() if line.startswith("RESULT "))[7:])
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(
        PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)]
    assert got == expected
    assert "FOLLOWER on several hosts only process 0 takes requests" in out1


def test_a_dead_process_stops_the_other(tiny_checkpoints):
    """Process 1 vanishes after the first request: process 0 must not hang. JAX's coordination
    service notices the missing heartbeat and stops it, naming the crash."""
    procs = _launch(tiny_checkpoints["llama3"], "die")
    t0 = time.time()
    out0, out1 = _finish(procs, 240)
    assert "RESULT " in out0, out0[-3000:]  # the first request was served by both
    assert procs[1].returncode == 3
    stopped = procs[0].returncode != 0 and "crashed" in out0
    failed_clearly = "ERROR after" in out0
    assert stopped or failed_clearly, out0[-3000:]
    assert "NO ERROR" not in out0
    assert time.time() - t0 < 240
