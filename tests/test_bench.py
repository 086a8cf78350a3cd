"""`jaxllm bench` runs end to end on CPU with a tiny model and reports consistent numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxllm.cli import main


def _report(tmp_path, argv):
    path = tmp_path / "report.json"
    assert main(["bench", *argv, "--report-json", str(path)]) == 0
    return json.loads(path.read_text())


def test_throughput_report(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXLLM_OVERLAP", "0")  # a switch the report records
    r = _report(tmp_path, ["throughput", "--model", str(tiny_checkpoints["llama3"]), "--num-requests", "12",
                           "--input-len", "20", "--output-len", "7", "--max-batch-size", "4",
                           "--max-num-tokens", "96"])
    # what defines the run: its batch, token budget, steps a call, and the jaxllm switches it ran under
    assert (r["max_batch_size"], r["max_num_tokens"], r["decode_steps"]) == (4, 96, 16)
    assert r["switches"]["JAXLLM_OVERLAP"] == "0" and all(k.startswith("JAXLLM_") for k in r["switches"])
    # its decode calls by loop kind: on a CPU each a while loop, none chained
    assert set(r["decode_loops"]) == {"while"} and r["decode_loops"]["while"] >= 3
    assert r["requests"] == 12 and r["input_tokens"] == 12 * 20 and r["output_tokens"] == 12 * 7
    assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
    assert r["total_tok_s"] == pytest.approx((r["input_tokens"] + r["output_tokens"]) / r["seconds"])
    assert r["requests_per_s"] == pytest.approx(12 / r["seconds"])
    for key in ("ttft_s", "tpot_s", "e2e_latency_s"):
        s = r[key]
        assert 0 < s["p50"] <= s["p99"] and s["mean"] > 0
    assert r["ttft_s"]["p99"] <= r["e2e_latency_s"]["p99"]
    assert r["e2e_latency_s"]["p99"] <= r["seconds"] + 1e-6
    # at most 4 run at once: later requests wait, so the slowest TTFT exceeds the fastest e2e
    assert r["ttft_s"]["p99"] > r["e2e_latency_s"]["p50"] / 4
    assert 1 <= r["peak_kv_blocks"] <= r["kv_capacity_blocks"]
    assert r["device_memory"] == {"at_kv_planning": None, "after_run": None}  # allocator figures: GPUs only
    assert r["timed_run_gpu_clocks"] is None  # nvidia-smi's clocks and power: GPUs only
    assert r["mfu"] is None and r["mbu"] is None  # no peak rates known for a CPU
    assert r["startup_to_first_token_s"] >= r["load_s"] > 0
    # where the engine thread's time went in the timed run, phase by phase
    phases = r["engine_phases"]
    assert {"prefill_inputs", "prefill_call", "prefill_fetch", "decode_inputs", "decode_call", "decode_fetch",
            "schedule", "text"} <= set(phases)
    assert all(v["calls"] >= 1 and v["seconds"] >= 0 for v in phases.values())
    assert phases["decode_call"]["calls"] == phases["decode_fetch"]["calls"]  # one fetch per decode call
    assert phases["decode_call"]["ms_per_call"] == pytest.approx(
        1e3 * phases["decode_call"]["seconds"] / phases["decode_call"]["calls"], rel=1e-3, abs=1e-3)
    assert sum(v["seconds"] for v in phases.values()) <= r["seconds"]  # the timed run's steps, nothing else
    out = capsys.readouterr().out
    assert "output tok/s" in out and "TTFT ms" in out and "engine decode_call ms" in out


def test_peak_rates_give_mfu_and_mbu(tiny_checkpoints, tmp_path):
    r = _report(tmp_path, ["latency", "--model", str(tiny_checkpoints["llama3"]), "--input-len", "8",
                           "--output-len", "5", "--iterations", "2", "--peak-tflops", "1", "--peak-tbps", "0.1"])
    assert r["requests"] == 2 and r["output_tokens"] == 10
    assert 0 < r["mfu"] < 1 and 0 < r["mbu"] < 1
    # MBU at batch 1: weight bytes + KV per step (mean context 8 + 5/2) over TPOT, against the given bandwidth
    step_bytes = r["weight_bytes"] + 10.5 * r["kv_bytes_per_token"]
    assert r["devices"] == 1 and r["mbu"] == pytest.approx(step_bytes / r["tpot_s"]["mean"] / 0.1e12)


def test_mbu_counts_every_tensor_parallel_device(tiny_checkpoints, tmp_path):
    """At tp=2 both devices read their half of the weights at once: the peak is twice one device's."""
    path = tmp_path / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    cmd = [sys.executable, "-m", "jaxllm", "bench", "latency", "--model", str(tiny_checkpoints["llama3"]),
           "--input-len", "8", "--output-len", "5", "--iterations", "2", "--peak-tflops", "1", "--peak-tbps", "0.1",
           "--tensor-parallel-size", "2", "--report-json", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(path.read_text())
    step_bytes = r["weight_bytes"] + 10.5 * r["kv_bytes_per_token"]
    assert r["devices"] == 2 and r["mbu"] == pytest.approx(step_bytes / r["tpot_s"]["mean"] / (2 * 0.1e12))


def test_quantization_and_fp8_kv_flags(tiny_checkpoints, tmp_path):
    """--quantization and --kv-cache-dtype reach the LLM: fewer weight bytes, half the KV bytes."""
    common = ["latency", "--model", str(tiny_checkpoints["llama3"]), "--input-len", "8", "--output-len", "3",
              "--iterations", "1", "--dtype", "bfloat16", "--load-format", "dummy"]
    base = _report(tmp_path, common)
    quant = _report(tmp_path, common + ["--quantization", "int8", "--kv-cache-dtype", "fp8"])
    assert base["kv_cache_dtype"] == "bfloat16" and quant["kv_cache_dtype"] == "float8_e4m3fn"
    assert quant["kv_bytes_per_token"] * 2 == base["kv_bytes_per_token"]
    assert quant["quantization"] == "int8" and base["quantization"] is None
    assert quant["weight_bytes"] < base["weight_bytes"]


def test_dataset_file(tiny_checkpoints, tmp_path):
    data = tmp_path / "requests.jsonl"
    data.write_text(
        json.dumps({"prompt": "The capital of France is", "output_len": 3}) + "\n\n"
        + json.dumps({"prompt_token_ids": [5, 6, 7, 8], "output_len": 6}) + "\n"
        + json.dumps({"prompt": "Hello"}) + "\n"
    )
    r = _report(tmp_path, ["throughput", "--model", str(tiny_checkpoints["llama3"]), "--dataset", str(data),
                           "--output-len", "4"])
    assert r["requests"] == 3 and r["output_tokens"] == 3 + 6 + 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-requests", "0"], "--num-requests must be an integer >= 1"),
        (["--output-len", "-1"], "--output-len must be an integer >= 1"),
        (["--input-len", "600"], "more than max_seq_len"),
    ],
)
def test_bad_arguments(tiny_checkpoints, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "throughput", "--model", str(tiny_checkpoints["llama3"]), *argv])


def test_bad_dataset_line(tiny_checkpoints, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(SystemExit, match='bad.jsonl:1 needs "prompt" or "prompt_token_ids"'):
        main(["bench", "throughput", "--model", str(tiny_checkpoints["llama3"]), "--dataset", str(data)])


def test_precompile_flag(tiny_checkpoints, tmp_path, capsys):
    """--precompile-max-len compiles the greedy step programs before the warm-up and reports them."""
    common = ["throughput", "--model", str(tiny_checkpoints["llama3"]), "--num-requests", "3", "--input-len", "6",
              "--output-len", "3", "--max-batch-size", "2"]
    r = _report(tmp_path, common + ["--precompile-max-len", "16"])
    assert r["precompile"]["programs"] > 0 and r["precompile"]["seconds"] > 0
    assert "precompiled" in capsys.readouterr().err
    assert _report(tmp_path, common + ["--precompile-max-len", "0"])["precompile"] is None
    r = _report(tmp_path, common)
    assert r["precompile"]["programs"] > 0, "on by default: the longest request's length"
    assert r["timed_run_compiles"]["programs"] == 0, "precompile covered every program of the timed run"
    with pytest.raises(SystemExit, match="--precompile-max-len must be >= 0"):
        main(["bench", *common, "--precompile-max-len", "-1"])


def test_compile_counter_sees_compiles_on_any_thread():
    """bench's CompileCounter counts each XLA program compiled inside it (here one on another thread)."""
    import threading

    import jax
    import jax.numpy as jnp

    from jaxllm.bench import CompileCounter

    x = jnp.arange(5)
    f = jax.jit(lambda x: x * 3 + 1)
    with CompileCounter() as c:
        t = threading.Thread(target=lambda: f(x).block_until_ready())
        t.start()
        t.join()
        f(x).block_until_ready()  # compiled already: not counted again
    assert c.count == 1 and c.seconds > 0
    jax.jit(lambda x: x - 1)(x)  # outside the block: not counted
    assert c.count == 1


def test_gc_pauses_counts_collections_on_any_thread():
    """bench's GcPauses counts each garbage collection inside it by generation, with its pause."""
    import gc
    import threading

    from jaxllm.bench import GcPauses

    with GcPauses() as g:
        gc.collect()
        t = threading.Thread(target=lambda: gc.collect(1))
        t.start()
        t.join()
    gc.collect()  # outside the block: not counted
    assert g.count == {2: 1, 1: 1} and g.seconds >= g.longest > 0
    assert g.report()["collections"] == {"1": 1, "2": 1}


def test_gpu_clocks_sample_nvidia_smi(tmp_path, monkeypatch):
    """bench's GpuClocks runs nvidia-smi beside the block (the GPUs the process sees, every
    interval_ms) and reports the SM clock and power over its samples, and the share of them at the
    power cap; lines it cannot read are skipped. No tool (or on=False): no process, no report."""
    import time

    from jaxllm.bench import GpuClocks

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"""#!/bin/sh
echo "$@" > {tmp_path}/args.txt
while true; do
  echo "1500, 1980, 690.5, 700.00, 0x0000000000000004"
  echo "1700, 1980, 610.5, 700.00, 0x0000000000000000"
  echo "[N/A], [N/A], [N/A], [N/A], [N/A]"
  sleep 0.02
done
""")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with GpuClocks(tool=str(fake), interval_ms=50) as clocks:
        deadline = time.time() + 10
        while len(clocks.samples) < 4 and time.time() < deadline:
            time.sleep(0.05)
    assert clocks._proc.poll() is not None  # stopped with the block
    r = clocks.report()
    n = r["samples"]
    assert n >= 4 and n == len(clocks.samples)
    capped = sum(1 for x in clocks.samples if x[0] == 1500)
    assert r["power_capped_share"] == round(capped / n, 3) and 0 < capped < n
    assert r["sm_mhz_min"] == 1500 and r["sm_mhz_rated_max"] == 1980 and r["power_limit_w"] == 700
    assert r["power_w_max"] == 690.5 and 610.5 <= r["power_w_mean"] <= 690.5
    args = (tmp_path / "args.txt").read_text().split()
    assert "--format=csv,noheader,nounits" in args and "--loop-ms=50" in args and "--id=0,1" in args
    assert any(a.startswith("--query-gpu=clocks.sm,") for a in args)
    with GpuClocks(on=False) as off:
        pass
    assert off.report() is None and off._proc is None
    with GpuClocks(tool="no-such-nvidia-smi-here") as missing:
        pass
    assert missing.report() is None
