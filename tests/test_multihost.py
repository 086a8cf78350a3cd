"""Several hosts on one machine: two processes joined by jax.distributed (gloo on CPU), each with
2 devices, one model tensor-parallel over all 4. Process 0 takes the requests; process 1 makes
the same device calls (see jaxllm/runner/multihost.py). Also: jaxllm's own distributed start-up
(jaxllm/sharding/distributed.py) and ``jaxllm launch``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm import SamplingParams
from jaxllm.cli import main as cli_main
from jaxllm.sharding import distributed

WORKER = Path(__file__).with_name("multihost_worker.py")
SRC = str(Path(__file__).parents[1] / "src")
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(10, 50))}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLLM_", "SLURM_", "OMPI_"))}
    return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=SRC, **extra)


def _launch(model, mode):
    """Two workers that call jax.distributed.initialize themselves. The JAXLLM_* variables are set
    too (to a coordinator nobody runs): LLM() must keep the program's own set-up, not start another."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(model), mode],
                             env=_env(JAXLLM_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
                                      JAXLLM_NUM_PROCESSES="2", JAXLLM_PROCESS_ID=str(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _jaxllm_launch(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxllm", "launch", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _expected(tiny_llm):
    return [o.outputs[0].token_ids for o in tiny_llm.generate(
        PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)]


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


def _finish_launch(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("jaxllm launch hung")


def test_jaxllm_launch_two_processes_tensor_parallel_over_both(tiny_checkpoints, tiny_llm):
    """`jaxllm launch --nproc 2`: the program never calls jax.distributed; LLM() starts it from the
    JAXLLM_* variables, and tp=4 over 2 processes x 2 devices gives the single-process tokens."""
    proc = _jaxllm_launch("--nproc", "2", "--", sys.executable, str(WORKER), "env", "env",
                          str(tiny_checkpoints["llama3"]), "generate")
    out, err = _finish_launch(proc, 240)
    assert proc.returncode == 0, (out + err)[-3000:]
    got = json.loads(next(line for line in out.splitlines() if line.startswith("[0] RESULT "))[11:])
    assert got == _expected(tiny_llm)
    assert "[1] FOLLOWER on several hosts only process 0 takes requests" in out
    assert not any(line.startswith("[1] RESULT") for line in out.splitlines())


def test_a_dead_process_stops_the_other(tiny_checkpoints, tiny_llm):
    """Process 1 vanishes after the first request: process 0 must not hang. JAX's coordination
    service notices the missing heartbeat and stops it, naming the crash. (These workers call
    jax.distributed.initialize themselves: a program that does keeps working.)"""
    procs = _launch(tiny_checkpoints["llama3"], "die")
    t0 = time.time()
    out0, out1 = _finish(procs, 240)
    results = [line for line in out0.splitlines() if line.startswith("RESULT ")]
    assert results, out0[-3000:]  # the first request was served by both
    assert json.loads(results[0][7:]) == _expected(tiny_llm)
    assert procs[1].returncode == 3
    stopped = procs[0].returncode != 0 and "crashed" in out0
    failed_clearly = "ERROR after" in out0
    assert stopped or failed_clearly, out0[-3000:]
    assert "NO ERROR" not in out0
    assert time.time() - t0 < 240


def test_launch_returns_the_failing_status_and_stops_the_others():
    code = ("import os, sys, time; i = int(os.environ['JAXLLM_PROCESS_ID']); print('PID', os.getpid(), flush=True); "
            "time.sleep(1) if i == 1 else time.sleep(120); sys.exit(7 if i == 1 else 0)")
    t0 = time.time()
    proc = _jaxllm_launch("--nproc", "2", sys.executable, "-c", code)
    out, err = _finish_launch(proc, 60)
    assert proc.returncode == 7, out + err
    assert time.time() - t0 < 30  # process 0 (asleep for 120 s) was stopped, not waited for
    pids = {line.split()[0]: int(line.split()[2]) for line in out.splitlines() if " PID " in line}
    assert set(pids) == {"[0]", "[1]"}
    with pytest.raises(ProcessLookupError):
        os.kill(pids["[0]"], 0)
    assert "stopped all processes (a process exited with status 7)" in err


def test_launch_sigterm_stops_every_process():
    code = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(120)"
    proc = _jaxllm_launch("--nproc", "2", sys.executable, "-c", code)
    pids = []
    while len(pids) < 2:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        pids.append(int(line.split()[2]))
    proc.send_signal(signal.SIGTERM)
    out, err = _finish_launch(proc, 30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_launch_sets_each_process_its_id_count_and_coordinator():
    code = "import os; print(*(os.environ['JAXLLM_' + k] for k in ('PROCESS_ID', 'NUM_PROCESSES', 'COORDINATOR_ADDRESS')))"
    proc = _jaxllm_launch("--nnodes", "2", "--node-rank", "1", "--coordinator", "10.0.0.1:5555", "--nproc", "2",
                          sys.executable, "-c", code)
    out, err = _finish_launch(proc, 60)
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == ["[2] 2 4 10.0.0.1:5555", "[3] 3 4 10.0.0.1:5555"]


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0", "true"], "--nproc must be >= 1, got 0"),
    (["--nproc", "2"], "give the COMMAND to run"),
    (["--nproc", "1", "--nnodes", "2", "true"], "--coordinator HOST:PORT (node 0's address) is needed"),
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--coordinator", "h:1", "true"],
     "--node-rank must be in [0, 1], got 2"),
    (["--nproc", "1", "--coordinator-port", "70000", "true"], "--coordinator-port must be in [1, 65535], got 70000"),
])
def test_launch_refuses_bad_arguments(args, message):
    with pytest.raises(SystemExit) as info:
        cli_main(["launch", *args])
    assert message in str(info.value)


# -- where the distributed settings come from (no processes started) ---------------------------------
SLURM = {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "node[01-02]"}


@pytest.mark.parametrize("kwargs, environ, expected", [
    ({}, {}, None),  # one process: nothing to start
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({}, {"JAXLLM_COORDINATOR_ADDRESS": "h:2", "JAXLLM_NUM_PROCESSES": "3", "JAXLLM_PROCESS_ID": "2"},
     {"coordinator_address": "h:2", "num_processes": 3, "process_id": 2}),
    ({"process_id": 0}, {"JAXLLM_COORDINATOR_ADDRESS": "h:2", "JAXLLM_NUM_PROCESSES": "3", "JAXLLM_PROCESS_ID": "2"},
     {"coordinator_address": "h:2", "num_processes": 3, "process_id": 0}),  # an argument beats the variable
    ({}, SLURM, {}),  # srun step of 4 tasks: JAX's own Slurm detection fills everything
    ({"coordinator_address": "h:3"}, SLURM, {"coordinator_address": "h:3"}),
    ({}, dict(SLURM, SLURM_NTASKS="1"), None),
    ({}, {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),  # a batch script is one task
    ({}, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, {}),
    ({"num_processes": 1}, SLURM, None),  # explicitly one process under a launcher
    ({}, dict(SLURM, JAXLLM_NUM_PROCESSES="1"), None),
])
def test_settings_come_from_arguments_then_environment_then_launcher(kwargs, environ, expected):
    assert distributed.resolve(**kwargs, environ=environ) == expected


@pytest.mark.parametrize("kwargs, environ, exc, message", [
    ({"num_processes": 0}, {}, ValueError, "num_processes must be >= 1, got 0"),
    ({"num_processes": 2, "process_id": 2}, {}, ValueError, "process_id must be in [0, 1] (num_processes is 2), got 2"),
    ({"process_id": -1}, {}, ValueError, "process_id must be >= 0, got -1"),
    ({"num_processes": "2"}, {}, TypeError, "num_processes must be an int, got '2'"),
    ({"coordinator_address": "10.0.0.1"}, {}, ValueError,
     "coordinator_address must be 'HOST:PORT' with a port in [1, 65535], got '10.0.0.1'"),
    ({"coordinator_address": "h:0"}, {}, ValueError, "coordinator_address must be 'HOST:PORT' with a port in [1, 65535]"),
    ({}, {"JAXLLM_NUM_PROCESSES": "two"}, ValueError, "JAXLLM_NUM_PROCESSES must be an integer, got 'two'"),
    ({}, {"JAXLLM_NUM_PROCESSES": "2", "JAXLLM_PROCESS_ID": "5"}, ValueError,
     "JAXLLM_PROCESS_ID must be in [0, 1] (JAXLLM_NUM_PROCESSES is 2), got 5"),
    ({}, {"JAXLLM_COORDINATOR_ADDRESS": "h"}, ValueError, "JAXLLM_COORDINATOR_ADDRESS must be 'HOST:PORT'"),
    ({"num_processes": 2}, {}, ValueError,
     "several processes need coordinator_address (LLM(coordinator_address=...) or JAXLLM_COORDINATOR_ADDRESS) "
     "and process_id (LLM(process_id=...) or JAXLLM_PROCESS_ID) too"),
])
def test_bad_settings_name_the_argument_and_the_range(kwargs, environ, exc, message):
    with pytest.raises(exc) as info:
        distributed.resolve(**kwargs, environ=environ)
    assert message in str(info.value)


def test_several_processes_after_jax_started_is_refused(monkeypatch):
    import jax

    jax.devices()  # this process's backend is running
    for var in ("JAXLLM_COORDINATOR_ADDRESS", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match=r"create LLM\(...\) before any other JAX call"):
        distributed.maybe_initialize("127.0.0.1:1234", 2, 0)
    assert not jax.distributed.is_initialized()
    assert distributed.maybe_initialize() is False  # one process: nothing to do, no error
