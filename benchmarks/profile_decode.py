"""Where a decode's time goes: a JAX profiler trace of the engine, summarized.

    python benchmarks/profile_decode.py --model .models/llama-3.1-8b-shapes [--output-len 64] [--decode-steps 16]
        [--batch 1] [--trace-dir DIR] [--top 30] [--hlo-dir DIR]

Warms up, then traces --batch requests at once (128 prompt tokens each, --output-len new ones;
batch 256 shows a throughput run's decode step) and reads the Perfetto
trace back: the wall time, how long the GPU streams were busy (the union of their kernels), the
idle gaps between kernels longer than --gap-us, which host events overlap those gaps (by
total overlap) -- the host work nothing hides -- and the device time by kernel name (the top ones). Also prints the engine's own phase times
(LLM.get_phase_times). Issue 4: batch-1 ITL carries ~6.6 ms per 16-step decode call that the
decode-steps sweep could not attribute.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import time


def load_trace(trace_dir: str):
    """(events, process names, thread names) of the newest Perfetto trace under trace_dir."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e], procs, threads


def union(intervals):
    """Merged [start, end) intervals, sorted."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def summarize(events, procs, threads, device_pattern: str, gap_us: float, top: int = 12,
              thread_pattern: str = "Stream", timeline: int = 0, timeline_from: str = "") -> dict:
    """Device busy time, idle gaps and the host events in them (times in microseconds). Device
    events: those of processes named like device_pattern, on threads named like thread_pattern."""
    def is_device(e):
        return (device_pattern in procs.get(e["pid"], "")
                and thread_pattern in threads.get((e["pid"], e["tid"]), thread_pattern))

    dev = [(e["ts"], e["ts"] + e["dur"]) for e in events if is_device(e)]
    host = [e for e in events if "/host" in procs.get(e["pid"], "")]
    if not dev:
        return {"device_events": 0}
    busy = union(dev)
    t0, t1 = busy[0][0], busy[-1][1]
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] > gap_us]
    by_kernel, launches, by_module = collections.Counter(), collections.Counter(), collections.Counter()
    module_kernels = collections.defaultdict(collections.Counter)
    for e in events:
        if is_device(e):
            by_kernel[e["name"]] += e["dur"]
            launches[e["name"]] += 1
            # the XLA program a kernel belongs to (prefill vs decode), where the trace names it
            module = str((e.get("args") or {}).get("hlo_module", "?"))
            by_module[module] += e["dur"]
            module_kernels[module][e["name"]] += e["dur"]
    # the host's own events by total and longest single duration (TraceMe / CUDA API events: where a
    # dispatch waits -- e.g. a launch blocking on a full queue, or a synchronizing call)
    host_total, host_longest = collections.Counter(), collections.Counter()
    for e in host:
        host_total[e["name"]] += e["dur"]
        host_longest[e["name"]] = max(host_longest[e["name"]], e["dur"])
    overlap = collections.Counter()
    for e in host:
        s, t = e["ts"], e["ts"] + e["dur"]
        for g0, g1 in gaps:
            o = min(t, g1) - max(s, g0)
            if o > 0:
                overlap[e["name"]] += o
    return {
        "device_events": len(dev),
        "span_us": t1 - t0,
        "busy_us": sum(e - s for s, e in busy),
        "gaps": len(gaps),
        "gap_us": sum(g1 - g0 for g0, g1 in gaps),
        "longest_gaps_us": sorted((round(g1 - g0, 1) for g0, g1 in gaps), reverse=True)[:top],
        "host_in_gaps_us": {k: round(v, 1) for k, v in overlap.most_common(top)},
        "host_us_by_event": {k: round(v, 1) for k, v in host_total.most_common(top)},
        "host_longest_us_by_event": {k: round(v, 1) for k, v in host_longest.most_common(top)},
        "device_us_by_kernel": {k: round(v, 1) for k, v in by_kernel.most_common(top)},
        "launches_by_kernel": {k: launches[k] for k, _ in by_kernel.most_common(top)},
        "device_us_by_module": {k: round(v, 1) for k, v in by_module.most_common(top)},
        # the two busiest programs (a throughput run's prefill and decode), kernel by kernel
        "device_us_by_kernel_of_module": {m: {k: round(v, 1) for k, v in module_kernels[m].most_common(top)}
                                          for m, _ in by_module.most_common(2)},
        "kernel_launches": sum(launches.values()),
        "timeline": kernel_timeline([e for e in events if is_device(e)], timeline, timeline_from),
    }


def kernel_timeline(dev_events, n: int, start_at: str = "") -> list[str]:
    """n consecutive device events from the middle of the trace (a decode step's layers), or from
    the first one after the middle whose name contains `start_at` (e.g. MemcpyD2H: a step's end):
    the start (µs after the first listed), the idle time since the previous one ended, the duration
    and the kernel -- where the gaps between a layer's kernels are."""
    if n <= 0 or not dev_events:
        return []
    evs = sorted(dev_events, key=lambda e: e["ts"])
    mid = len(evs) // 2
    if start_at:
        mid = next((i for i in range(mid, len(evs)) if start_at in evs[i]["name"]), mid)
    window = evs[mid: mid + n]
    t0, prev_end, out = window[0]["ts"], window[0]["ts"], []
    for e in window:
        out.append(f"{e['ts'] - t0:9.1f} gap {e['ts'] - prev_end:6.1f} dur {e['dur']:7.1f}  {e['name'][:70]}")
        prev_end = max(prev_end, e["ts"] + e["dur"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="requests decoded together")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (--device-pattern /device:GPU:0: one GPU's streams)")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default=None, help='KvCacheConfig(dtype=...), e.g. "fp8"')
    ap.add_argument("--kv-fraction", type=float, default=0.9, help="KvCacheConfig(free_gpu_memory_fraction=...)")
    ap.add_argument("--max-num-tokens", type=int, default=8192, help="a prefill call's token budget")
    ap.add_argument("--trace-dir", default="/tmp/jaxllm-trace")
    ap.add_argument("--device-pattern", default="/device:GPU", help="process names of the device's streams")
    ap.add_argument("--gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=12, help="how many kernels / gaps / host events to list")
    ap.add_argument("--timeline", type=int, default=0,
                    help="list this many consecutive kernels from mid-trace with the gaps between them")
    ap.add_argument("--timeline-from", default="", help="start the timeline at the first kernel after mid-trace "
                    "whose name contains this (e.g. MemcpyD2H, the end of a step)")
    ap.add_argument("--python-tracer-level", type=int, default=0,
                    help="jax.profiler's Python tracer (its default, 1, records every Python call: at 1024 requests "
                         "a trace too large to read back within a device call, and the host phases inflated)")
    ap.add_argument("--hlo-dir", default=None,
                    help="dump the decode programs' optimized HLO here and name what each top kernel computes")
    args = ap.parse_args()
    if args.hlo_dir:  # before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.hlo_dir}"
                                   " --xla_dump_hlo_module_re=.*(decode|prefill)_impl.*").strip()
    import jax

    from jaxllm import KvCacheConfig, LLM, SamplingParams

    kv = KvCacheConfig(dtype=args.kv_cache_dtype or "auto", free_gpu_memory_fraction=args.kv_fraction)
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_batch_size=args.batch,
              tensor_parallel_size=args.tp, quantization=args.quantization, kv_cache_config=kv,
              max_num_tokens=args.max_num_tokens,
              max_seq_len=128 + args.output_len + args.decode_steps,
              decode_steps=args.decode_steps)
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    vocab = llm.model_config.vocab_size

    def prompts(first):  # args.batch prompts of 128 tokens, none sharing a prefix with another call's
        return [{"prompt_token_ids": [(first + 7919 * i + j) % vocab for j in range(128)]} for i in range(args.batch)]

    llm.generate(prompts(1000), sp, use_tqdm=False)  # compiles
    llm.generate(prompts(2000), sp, use_tqdm=False)
    llm.reset_phase_times()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = args.python_tracer_level
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True, profiler_options=options):
        t = time.perf_counter()
        out = llm.generate(prompts(3000), sp, use_tqdm=False)
        wall = time.perf_counter() - t
    phases = llm.get_phase_times()
    llm.shutdown()
    n = len(out[0].outputs[0].token_ids)
    print(f"{args.batch} request(s), 128 + {n} tokens each, decode_steps {args.decode_steps}: {1e3 * wall:.1f} ms "
          f"({1e3 * wall / n:.2f} ms per step, prefill included)")
    print("engine phases (ms per call x calls):")
    for p, v in phases.items():
        print(f"  {p:<16} {1e3 * v['seconds'] / v['calls']:9.3f} x {v['calls']}")
    s = summarize(*load_trace(args.trace_dir), args.device_pattern, args.gap_us, args.top, timeline=args.timeline,
                  timeline_from=args.timeline_from)
    if args.hlo_dir:
        named = dict(s.get("device_us_by_kernel", {}))
        for kernels in s.get("device_us_by_kernel_of_module", {}).values():
            named.update(kernels)
        s["kernel_hlo"] = kernel_hlo(args.hlo_dir, named)
    print(json.dumps(s, indent=1))


def kernel_hlo(hlo_dir: str, kernels) -> dict:
    """{kernel name: its HLO instruction's result type and the jnp op it came from}, read from the
    newest optimized decode program dumped in hlo_dir, then the newest prefill program (a kernel named like ``gemm_fusion_dot_387``
    is the fusion ``%gemm_fusion_dot.387``; XLA reuses one kernel for identical fusions, so a name
    may stand for several instructions of the same shape)."""
    import re

    text = ""
    for kind in ("decode", "prefill"):  # the newest of each: a decode kernel's name first
        files = sorted(glob.glob(os.path.join(hlo_dir, f"*{kind}_impl*after_optimizations.txt")), key=os.path.getmtime)
        text += open(files[-1]).read() + "\n" if files else ""
    out = {}
    for name in kernels:
        for cand in (name, re.sub(r"_(\d+)$", r".\1", name)):
            m = re.search(rf"^\s*%{re.escape(cand)} = (.+?) ([\w-]+)\((.*)$", text, re.M)
            if m:
                op = re.search(r'op_name="([^"]*)"', m.group(3))
                out[name] = " ".join(x for x in (m.group(1), m.group(2), op.group(1)[-80:] if op else "") if x)
                break
    return out


if __name__ == "__main__":
    main()
