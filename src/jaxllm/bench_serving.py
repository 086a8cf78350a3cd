"""``jaxllm bench serving``: drive a running OpenAI-compatible server (jaxllm serve, or any other)
with streaming completions at a request rate or a concurrency, and report TTFT, TPOT, ITL and
end-to-end latency percentiles.

    jaxllm bench serving --base-url http://127.0.0.1:8000 --model NAME --num-prompts 200 \\
        --request-rate 10 --input-len 128 --output-len 128 [--max-concurrency 64] [--report-json F]

Prompts are random token ids (sent as token-id prompts, so any tokenizer does); requests arrive as
a Poisson process at --request-rate (inf: all at once), at most --max-concurrency in flight. Each
request streams; TTFT is the time to its first non-empty chunk, ITL the gaps between chunks, TPOT
(end - first chunk) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--api-key", default="none")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000, help="random prompt ids are drawn below this")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-json", default=None)


def _pct(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    if xs.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


async def _run(args) -> dict:
    import openai

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(100, args.vocab, args.input_len).tolist() for _ in range(args.num_prompts)]
    client = openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0,
                                timeout=3600)
    sem = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
    results = []

    async def one(prompt):
        async with sem:
            t0 = time.perf_counter()
            stamps, tokens, err = [], 0, None
            try:
                stream = await client.completions.create(
                    model=args.model, prompt=prompt, max_tokens=args.output_len, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        stamps.append(time.perf_counter())
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - counted and reported
                err = f"{type(e).__name__}: {e}"
            results.append(dict(start=t0, end=time.perf_counter(), stamps=stamps, tokens=tokens, error=err))

    t_start = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    await client.close()

    ok = [r for r in results if r["error"] is None and r["stamps"]]
    ttft = [r["stamps"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    tpot = [(r["end"] - r["stamps"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    e2e = [r["end"] - r["start"] for r in ok]
    out_tokens = sum(r["tokens"] for r in ok)
    return dict(
        base_url=args.base_url, model=args.model, request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, requests=len(results), completed=len(ok),
        failed=len(results) - len(ok), errors=sorted({r["error"] for r in results if r["error"]})[:5],
        seconds=elapsed, requests_per_s=len(ok) / elapsed, output_tok_s=out_tokens / elapsed,
        ttft_s=_pct(ttft), tpot_s=_pct(tpot), itl_s=_pct(itl), e2e_latency_s=_pct(e2e),
    )


def main(args) -> int:
    report = asyncio.run(_run(args))
    print(f"jaxllm bench serving: {report['completed']}/{report['requests']} completed in {report['seconds']:.2f} s "
          f"({report['requests_per_s']:.2f} req/s, {report['output_tok_s']:.1f} output tok/s)")
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_latency_s", "latency")):
        s = report[key]
        if s["mean"] is not None:
            print(f"  {name:<8} ms  mean {1e3 * s['mean']:.2f}  p50 {1e3 * s['p50']:.2f}  p99 {1e3 * s['p99']:.2f}")
    if report["errors"]:
        print("  errors:", *report["errors"], sep="\n    ")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["failed"] == 0 else 1
