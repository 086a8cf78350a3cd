"""The ``jaxllm`` command line (also ``python -m jaxllm``)."""

from __future__ import annotations

import argparse
import sys

from . import bench


def _generate(args) -> int:
    from . import LLM, SamplingParams

    with LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_seq_len=args.max_seq_len) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for out in llm.generate(args.prompt, params, use_tqdm=False):
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def _serve(args) -> int:
    import os

    from .serve import serve

    llm = bench.make_llm(args)
    serve(
        llm, args.served_model_name or args.model, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("JAXLLM_API_KEY"),
        max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_body_bytes,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm", description="LLM inference on JAX/XLA")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("model", help="HF id, local HF folder or .gguf file")
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--load-format", default="auto")
    gen.add_argument("--max-seq-len", type=int, default=None)
    bench.add_arguments(sub.add_parser("bench", help="offline throughput / batch-1 latency benchmarks"))
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    srv.add_argument("model", help="HF id, local HF folder or .gguf file")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="required as Authorization: Bearer (default: $JAXLLM_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    srv.add_argument("--max-concurrent-requests", type=int, default=512, help="beyond it: 429")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="beyond it: 413")
    bench.add_llm_arguments(srv)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "serve":
        return _serve(args)
    parser.print_help(sys.stderr)
    return 2
