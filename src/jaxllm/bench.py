"""``jaxllm bench``: offline throughput and batch-1 latency on any model (like ``trtllm-bench``).

    jaxllm bench throughput --model M --num-requests 1000 --input-len 128 --output-len 128 [--load-format dummy]
    jaxllm bench throughput --model M --dataset requests.jsonl
    jaxllm bench latency --model M --input-len 128 --output-len 128 --iterations 5
    ... --report-json report.json

A warm-up pass of the same shapes (other random tokens, so the prefix cache does not help the timed
pass) compiles everything first. Every request of the timed pass is submitted at once and ends
with ignore_eos after exactly its output length. Times come from each request's metrics
(``RequestOutput.metrics``): TTFT = first token applied - accepted; TPOT = (finished - first token)
/ (output tokens - 1). MFU counts the model's matmul FLOPs (2 per weight per token, plus
attention's 4 * layers * heads * head_dim * context); MBU estimates the bytes a decode step reads
(weights + the batch's KV) at the measured step rate. Peak rates come from the device kind (H100,
H200) or --peak-tflops / --peak-tbps; elsewhere MFU and MBU are left out. On GPUs the report also
gives the SM clock and power over the timed run (``timed_run_gpu_clocks``, from ``nvidia-smi``): a
throughput run at the power limit runs at lower clocks, so a change that only hides work behind the
device's cannot make it faster.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import threading
import time

import numpy as np

# dense bf16 FLOP/s and HBM bytes/s by device kind (datasheet figures)
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import bench_serving

    sub = parser.add_subparsers(dest="mode", required=True)
    bench_serving.add_arguments(sub.add_parser("serving", help="drive a running OpenAI-compatible server"))
    for mode, help_ in (("throughput", "offline throughput: many requests at once"), ("latency", "batch-1 latency")):
        p = sub.add_parser(mode, help=help_)
        p.add_argument("--model", required=True, help="HF id, local HF folder or .gguf file")
        add_llm_arguments(p)
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
        p.add_argument("--peak-tbps", type=float, default=None, help="override the device's memory bandwidth")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--report-json", default=None, help="write the report here")
        p.add_argument("--precompile-max-len", type=int, default=None,
                       help="before the warm-up, compile every greedy step program for requests of up to this "
                            "many tokens with prompts of --input-len or more, in parallel (LLM.precompile; "
                            "default: the longest request's length; 0: off) -- so no compilation lands in the "
                            "timed run (a warm-up alone does not see every shape: on an H100, 1000 x 128/128 "
                            "measured 2,958 output tok/s with compiles in the timed run, 10,045 without)")
        if mode == "throughput":
            p.add_argument("--num-requests", type=int, default=100)
            p.add_argument("--dataset", default=None,
                           help='JSON lines: {"prompt": str} or {"prompt_token_ids": [...]}, optional "output_len"')
            p.add_argument("--warmup-requests", type=int, default=None,
                           help="default: 16 when precompiled, else min(num requests, max batch)")
        else:
            p.add_argument("--iterations", type=int, default=5)


def add_llm_arguments(p: argparse.ArgumentParser) -> None:
    """The LLM(...) arguments as flags (bench and serve share them)."""
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", help='"auto" or "dummy" (random weights)')
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=None)
    p.add_argument("--tokens-per-block", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default=None, help='KvCacheConfig(dtype=...): "auto", "bfloat16", "fp8", ...')
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--quantization", default=None, choices=["fp8", "int8", "fp8-w8a8"],
                   help="quantization of the projections at load: weight-only fp8 / int8, or fp8 weights with "
                        "FP8 x FP8 matmuls in calls of >= 64 tokens (default: none, or the checkpoint's)")


def _positive(name: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise SystemExit(f"jaxllm bench: {name} must be an integer >= 1, got {value!r}")


def _load_dataset(path: str, tokenizer, default_output: int) -> list[tuple[list[int], int]]:
    requests = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "prompt_token_ids" in rec:
                ids = [int(t) for t in rec["prompt_token_ids"]]
            elif "prompt" in rec:
                if tokenizer is None:
                    raise SystemExit(f"jaxllm bench: {path}:{n} has a text prompt but the model has no tokenizer")
                ids = tokenizer.encode(rec["prompt"])
            else:
                raise SystemExit(f'jaxllm bench: {path}:{n} needs "prompt" or "prompt_token_ids"')
            out_len = int(rec.get("output_len", rec.get("max_tokens", default_output)))
            if not ids or out_len < 1:
                raise SystemExit(f"jaxllm bench: {path}:{n} needs a non-empty prompt and output_len >= 1")
            requests.append((ids, out_len))
    if not requests:
        raise SystemExit(f"jaxllm bench: {path} holds no requests")
    return requests


def _random_ids(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(min(100, vocab - 1), vocab, size=n).tolist()


def _stats(xs) -> dict:
    xs = np.asarray([x for x in xs if x is not None], np.float64)
    if xs.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


def _phases(llm) -> dict:
    """Where the engine thread's time went in the timed run (LLM.get_phase_times), with ms per call."""
    return {p: {"seconds": round(v["seconds"], 6), "calls": v["calls"],
                "ms_per_call": round(1e3 * v["seconds"] / v["calls"], 4)} for p, v in llm.get_phase_times().items()}


def model_cost(llm) -> dict:
    """Weight bytes, matmul weights, and the attention FLOPs per token of context."""
    import jax

    cfg = llm.model_config
    leaves = jax.tree.leaves(llm._engine.runner.params)
    n_params = sum(int(x.size) for x in leaves)
    weight_bytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
    embed = cfg.vocab_size * cfg.hidden_size
    tied = getattr(cfg, "tie_word_embeddings", False)
    matmul_params = n_params if tied else n_params - embed  # the input embedding is a lookup
    from .runner import pool_bytes_per_token

    return dict(
        params=n_params,
        weight_bytes=weight_bytes,
        matmul_flops_per_token=2 * matmul_params,
        attn_flops_per_context_token=4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,
        kv_bytes_per_token=pool_bytes_per_token(cfg, llm._engine.runner.kv_dtype),
        kv_cache_dtype=np.dtype(llm._engine.runner.kv_dtype).name,
    )


def _peaks(args):
    import jax

    kind = jax.devices()[0].device_kind
    flops, bw = next((v for k, v in PEAKS.items() if k in kind), (None, None))
    if args.peak_tflops:
        flops = args.peak_tflops * 1e12
    if args.peak_tbps:
        bw = args.peak_tbps * 1e12
    return kind, flops, bw


def make_llm(args):
    from . import LLM, KvCacheConfig

    kv = {}
    if args.kv_cache_free_gpu_memory_fraction is not None:
        kv["free_gpu_memory_fraction"] = args.kv_cache_free_gpu_memory_fraction
    if args.tokens_per_block is not None:
        kv["tokens_per_block"] = args.tokens_per_block
    if args.kv_cache_dtype is not None:
        kv["dtype"] = args.kv_cache_dtype
    return LLM(
        args.model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        dtype=args.dtype,
        load_format=args.load_format,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        decode_steps=args.decode_steps,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        kv_cache_config=KvCacheConfig(**kv),
        attention_backend=args.attention_backend,
        quantization=args.quantization,
    )


class CompileCounter:
    """Counts the XLA programs compiled (or loaded from the persistent cache) inside a `with` block,
    on any thread, through JAX's monitoring events."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def _listen(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listen)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's event name


class GcPauses:
    """Python's garbage collections inside a `with` block, on any thread (gc.callbacks): how many of
    each generation, their total and longest pause -- a collection stops whichever thread
    allocated, the engine's included."""

    def __init__(self):
        self.count, self.seconds, self.longest = collections.Counter(), 0.0, 0.0
        self._start: dict[int, float] = {}

    def _callback(self, phase: str, info: dict) -> None:
        now, me = time.perf_counter(), threading.get_ident()
        if phase == "start":
            self._start[me] = now
        elif me in self._start:
            d = now - self._start.pop(me)
            self.count[info["generation"]] += 1
            self.seconds += d
            self.longest = max(self.longest, d)

    def report(self) -> dict:
        return dict(collections={str(g): n for g, n in sorted(self.count.items())}, seconds=round(self.seconds, 4),
                    longest_s=round(self.longest, 4))

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


class GpuClocks:
    """The GPUs' SM clock, power draw and power-cap state inside a `with` block, sampled every
    `interval_ms` by ``nvidia-smi`` (a process beside the run, none where the tool is missing or
    `on` is false): whether a run was held back by the power limit, which a throughput run on an
    H100 / H200 is (BENCHMARKS.md, twenty-third session) -- there work hidden behind the device's
    cannot pay. Samples of every GPU the process sees (CUDA_VISIBLE_DEVICES) count alike."""

    QUERY = "clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_event_reasons.active"
    SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bit for the software power cap

    def __init__(self, on: bool = True, interval_ms: int = 100, tool: str = "nvidia-smi"):
        import shutil

        self.tool = shutil.which(tool) if on else None
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, ...]] = []
        self._proc = self._reader = None

    def _read(self, stream) -> None:
        for line in stream:
            try:
                sm, sm_max, watts, limit, reasons = (x.strip() for x in line.split(","))
                self.samples.append((float(sm), float(sm_max), float(watts), float(limit), int(reasons, 16)))
            except ValueError:  # a header, "[N/A]" or a partial line
                continue

    def __enter__(self):
        if self.tool is not None:
            import subprocess

            ids = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            argv = [self.tool, f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"]
            if ids and all(i.strip().isdigit() for i in ids.split(",")):
                argv.append(f"--id={ids}")
            try:
                self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                return self
            self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
            self._reader.start()
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a sampler that will not stop must not fail the run
                self._proc.kill()
            self._reader.join(timeout=5)

    def report(self) -> dict | None:
        """Mean / min SM clock against the rated maximum, mean / max power against the limit, and the
        share of samples at the power cap; None without samples (no GPU, no nvidia-smi)."""
        if not self.samples:
            return None
        sm, sm_max, watts, limit, reasons = zip(*self.samples)
        return dict(samples=len(self.samples), sm_mhz_mean=round(float(np.mean(sm))), sm_mhz_min=min(sm),
                    sm_mhz_rated_max=max(sm_max), power_w_mean=round(float(np.mean(watts)), 1),
                    power_w_max=max(watts), power_limit_w=max(limit),
                    power_capped_share=round(sum(bool(r & self.SW_POWER_CAP) for r in reasons) / len(reasons), 3))


def _run(llm, requests) -> tuple[list, float]:
    """Submit every (prompt ids, output len) at once; wait for all; (outputs, wall seconds)."""
    from . import SamplingParams

    t0 = time.perf_counter()
    handles = [
        llm.generate_async(
            {"prompt_token_ids": ids},
            SamplingParams(max_tokens=n, ignore_eos=True, temperature=0, detokenize=False),
        )
        for ids, n in requests
    ]
    outs = [h.result() for h in handles]
    return outs, time.perf_counter() - t0


def _progress(msg: str) -> None:
    """A phase line on stderr, so that a run cut short by a time limit still shows where it was."""
    print(f"jaxllm bench: {msg}", file=sys.stderr, flush=True)


def _timings(outs) -> tuple[list, list, list]:
    ttft = [o.metrics.time_to_first_token for o in outs]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
        if len(o.outputs[0].token_ids) > 1 else None
        for o in outs
    ]
    e2e = [o.metrics.finished_time - o.metrics.arrival_time for o in outs]
    return ttft, tpot, e2e


def run(args) -> dict:
    from .runner import device_memory

    _positive("--input-len", args.input_len)
    _positive("--output-len", args.output_len)
    if args.mode == "throughput":
        _positive("--num-requests", args.num_requests)
        _positive("--warmup-requests", args.warmup_requests, allow_none=True)
    else:
        _positive("--iterations", args.iterations)
    if args.precompile_max_len is not None and args.precompile_max_len < 0:
        raise SystemExit(f"jaxllm bench: --precompile-max-len must be >= 0 (0: off), got {args.precompile_max_len}")
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    llm = make_llm(args)
    try:
        load_s = time.perf_counter() - t_start
        _progress(f"LLM() ready in {load_s:.1f} s")
        vocab = llm.model_config.vocab_size
        if args.mode == "throughput" and args.dataset:
            requests = _load_dataset(args.dataset, llm.tokenizer, args.output_len)
        elif args.mode == "throughput":
            requests = [(_random_ids(rng, args.input_len, vocab), args.output_len) for _ in range(args.num_requests)]
        else:
            requests = [(_random_ids(rng, args.input_len, vocab), args.output_len)]
        too_long = max(len(ids) + n for ids, n in requests)
        if too_long > llm.max_seq_len:
            raise SystemExit(f"jaxllm bench: a request needs {too_long} tokens, more than max_seq_len {llm.max_seq_len}")
        precompiled = None
        if args.precompile_max_len != 0:
            max_len = min(args.precompile_max_len or too_long, llm.max_seq_len)
            shortest = 1 if args.mode == "throughput" and args.dataset else args.input_len
            # random prompts share no prefix; a dataset's may, and prompts longer than the token
            # budget run in chunks, which continue where the last one stopped
            chunked = args.input_len > llm._engine.scheduler.max_num_tokens
            precompiled = llm.precompile(max_len=max_len, sampled=False, min_len=min(shortest, max_len),
                                         cached_prefixes=bool(getattr(args, "dataset", None)) or chunked)
            _progress(f"precompiled {precompiled['programs']} step programs in {precompiled['seconds']:.1f} s")

        # warm-up: the same lengths, other tokens (compiles every shape; no prefix-cache help later)
        if args.mode == "throughput":
            # precompiled: a few requests touch the programs once more; else a full batch compiles them
            k = args.warmup_requests or min(len(requests), 16 if precompiled else args.max_batch_size)
            warm = [(_random_ids(rng, len(ids), vocab), n) for ids, n in requests[:k]]
        else:
            warm = [(_random_ids(rng, args.input_len, vocab), args.output_len)]
        _progress(f"warm-up: {len(warm)} request(s) (compiles every shape)")
        warm_outs, warm_s = _run(llm, warm)
        first_token_s = min(o.metrics.first_token_time for o in warm_outs) - t_start
        _progress(f"warm-up done in {warm_s:.1f} s; timed run")
        llm.reset_phase_times()  # the engine's phases, counted over the timed run only

        on_gpu = llm._mesh.devices.flat[0].platform == "gpu"
        # a compile in the timed run makes its figures wrong; the clocks say whether power held it back
        with CompileCounter() as compiles, GcPauses() as gc_pauses, GpuClocks(on=on_gpu) as clocks:
            if args.mode == "throughput":
                outs, elapsed = _run(llm, requests)
                stats = llm.get_stats()
            else:
                outs, elapsed = [], 0.0
                for _ in range(args.iterations):
                    ids = _random_ids(rng, args.input_len, vocab)
                    o, t = _run(llm, [(ids, args.output_len)])
                    outs += o
                    elapsed += t
                stats = []
        if compiles.count:
            _progress(f"WARNING: {compiles.count} program(s) compiled during the timed run ({compiles.seconds:.1f} s): "
                      "its figures include compilation (raise --precompile-max-len, or precompile is off)")
        cost = model_cost(llm)
        phases = _phases(llm)
        # the timed run's decode calls by loop kind, and how many were chained (runner.decode_check_every)
        decode_loops = dict(sum((e.decode_loops for e in llm._engines), collections.Counter()))
        startup = dict(llm.startup_seconds)
        kv_capacity_blocks = llm.kv_capacity_tokens // llm._engine.runner.block_size
        # the allocator when the KV pool was planned and after the run (GPU; None on CPUs)
        memory = dict(at_kv_planning=llm.memory_at_kv_planning, after_run=device_memory(llm._mesh))
    finally:
        llm.shutdown()

    ttft, tpot, e2e = _timings(outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    # FLOPs: every prompt and generated token passes the matmuls once; attention at its context.
    flops = 0.0
    for o in outs:
        total = len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
        flops += total * cost["matmul_flops_per_token"] + cost["attn_flops_per_context_token"] * total * (total + 1) / 2
    kind, peak_flops, peak_bw = _peaks(args)
    # the peaks of every device the model runs on: tensor-parallel shards read their weights at once
    tp, dp = args.tensor_parallel_size or 1, args.data_parallel_size or 1
    peak_flops, peak_bw = (p * tp * dp if p else None for p in (peak_flops, peak_bw))
    tpot_mean = _stats(tpot)["mean"]
    mbu = None
    if peak_bw and tpot_mean:
        # a decode step reads each replica's weights and the KV of the running batch
        batch = (n_out / elapsed) * tpot_mean if args.mode == "throughput" else 1.0
        ctx = np.mean([len(o.prompt_token_ids) + len(o.outputs[0].token_ids) / 2 for o in outs])
        step_bytes = dp * cost["weight_bytes"] + batch * ctx * cost["kv_bytes_per_token"]
        mbu = step_bytes / tpot_mean / peak_bw
    report = dict(
        mode=args.mode,
        model=args.model,
        device=kind,
        devices=tp * dp,
        requests=len(outs),
        input_tokens=n_in,
        output_tokens=n_out,
        seconds=elapsed,
        requests_per_s=len(outs) / elapsed,
        output_tok_s=n_out / elapsed,
        total_tok_s=(n_in + n_out) / elapsed,
        ttft_s=_stats(ttft),
        tpot_s=_stats(tpot),
        itl_s=_stats(tpot),
        e2e_latency_s=_stats(e2e),
        peak_kv_blocks=max([s["kv_blocks_used"] for s in stats], default=None),
        device_memory=memory,
        kv_capacity_blocks=kv_capacity_blocks,
        mfu=(flops / elapsed / peak_flops) if peak_flops else None,
        mbu=mbu,
        weight_bytes=cost["weight_bytes"],
        kv_bytes_per_token=cost["kv_bytes_per_token"],
        kv_cache_dtype=cost["kv_cache_dtype"],
        quantization="fp8-w8a8" if llm.model_config.fp8_activations else llm.model_config.quantization,
        load_s=load_s,
        startup_to_first_token_s=first_token_s,
        startup_breakdown_s=dict(startup, first_generate=first_token_s - load_s),
        precompile=precompiled,
        timed_run_compiles=dict(programs=compiles.count, seconds=compiles.seconds),
        timed_run_gc=gc_pauses.report(),
        timed_run_gpu_clocks=clocks.report(),
        engine_phases=phases,
        decode_loops=decode_loops,
        attention_backend=args.attention_backend,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        decode_steps=args.decode_steps,
        # the jaxllm switches the run was made under (A/B runs differ in these alone)
        switches={k: v for k, v in sorted(os.environ.items()) if k.startswith("JAXLLM_")},
    )
    return report


def _fmt(x, scale=1.0, unit=""):
    return "-" if x is None else f"{x * scale:,.2f}{unit}"


def print_report(r: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [
        ("device", r["device"]),
        ("requests", f"{r['requests']} ({r['input_tokens']} in / {r['output_tokens']} out tokens)"),
        ("request/s", _fmt(r["requests_per_s"])),
        ("output tok/s", _fmt(r["output_tok_s"])),
        ("total tok/s", _fmt(r["total_tok_s"])),
    ]
    for key, name in (("ttft_s", "TTFT ms"), ("tpot_s", "TPOT ms"), ("e2e_latency_s", "latency ms")):
        s = r[key]
        rows.append((name, f"mean {_fmt(s['mean'], 1e3)}  p50 {_fmt(s['p50'], 1e3)}  p99 {_fmt(s['p99'], 1e3)}"))
    rows += [
        ("peak KV blocks", f"{r['peak_kv_blocks']} of {r['kv_capacity_blocks']}" if r["peak_kv_blocks"] else "-"),
        ("MFU", _fmt(r["mfu"], 100, "%")),
        ("MBU", _fmt(r["mbu"], 100, "%")),
        ("LLM() s", _fmt(r["load_s"])),
        ("LLM() to first token s", _fmt(r["startup_to_first_token_s"])),
    ]
    if (c := r.get("timed_run_compiles")) is not None:
        rows.append(("compiles in timed run", f"{c['programs']} ({c['seconds']:.1f} s)"))
    if (g := r.get("timed_run_gc")) is not None:
        rows.append(("GC in timed run", f"{g['collections']} {g['seconds']:.3f} s, longest {g['longest_s']:.3f} s"))
    if (c := r.get("timed_run_gpu_clocks")) is not None:
        rows.append(("GPU in timed run", f"SM {c['sm_mhz_mean']} MHz mean (min {c['sm_mhz_min']:.0f}, rated "
                                         f"{c['sm_mhz_rated_max']:.0f}); {c['power_w_mean']:.0f} W mean of "
                                         f"{c['power_limit_w']:.0f}; at the power cap {c['power_capped_share']:.0%}"))
    rows += [(f"engine {p} ms", f"{v['ms_per_call']:.3f} x {v['calls']}") for p, v in r.get("engine_phases", {}).items()]
    print(f"jaxllm bench {r['mode']}: {r['model']}", file=file)
    for name, value in rows:
        print(f"  {name:<24} {value}", file=file)


def main(args) -> int:
    if args.mode == "serving":
        from . import bench_serving

        return bench_serving.main(args)
    report = run(args)
    print_report(report)
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
