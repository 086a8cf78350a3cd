"""The ``jaxllm`` command line (also ``python -m jaxllm``)."""

from __future__ import annotations

import argparse
import sys

from . import bench


def _generate(args) -> int:
    from . import LLM, SamplingParams

    with LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_seq_len=args.max_seq_len) as llm:
        if llm.follower:  # several processes: process 0 prints the completions
            return 0
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        for out in llm.generate(args.prompt, params, use_tqdm=False):
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def _serve(args) -> int:
    import os

    from .serve import serve
    from .sharding.distributed import maybe_initialize

    maybe_initialize(args.coordinator_address, args.num_processes, args.process_id)
    llm = bench.make_llm(args)
    if llm.follower:  # several processes: process 0 serves; this one followed its device calls
        return 0
    if args.precompile_max_len:
        kinds = args.precompile_sampling
        done = llm.precompile(max_len=min(args.precompile_max_len, llm.max_seq_len),
                              greedy=kinds in ("both", "greedy"), sampled=kinds in ("both", "sampled"))
        print(f"jaxllm serve: compiled {done['programs']} step programs in {done['seconds']:.1f} s", flush=True)
    serve(
        llm, args.served_model_name or args.model, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("JAXLLM_API_KEY"),
        max_concurrent_requests=args.max_concurrent_requests, max_body_bytes=args.max_body_bytes,
    )
    return 0


LAUNCH_DOC = """Start COMMAND as --nproc processes of one jax.distributed job. Each gets
JAXLLM_COORDINATOR_ADDRESS, JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID, which LLM(...) reads to
join the others. Output lines are prefixed with [process id]. When one process exits with an
error the others are stopped and that status is returned; Ctrl-C or SIGTERM stop them all.

  jaxllm launch --nproc 2 python app.py
  # two machines (run on each; 10.0.0.1 is node 0):
  jaxllm launch --nnodes 2 --node-rank 0 --coordinator 10.0.0.1:5555 --nproc 1 python app.py
  jaxllm launch --nnodes 2 --node-rank 1 --coordinator 10.0.0.1:5555 --nproc 1 python app.py

Under Slurm or Open MPI no launcher is needed: srun / mpirun start the processes and LLM(...)
detects them (docs/launching.md)."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _forward(stream, sink, prefix: bytes, lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sink.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
            sink.flush()
    stream.close()


def _stop_all(procs, grace: float = 5.0) -> None:
    """SIGTERM every process group still running, SIGKILL what remains after `grace` seconds."""
    import os
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


def _exit_status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode  # killed by signal N: 128 + N


def launch(cmd: list[str], nproc: int, coordinator_port: int | None = None, nnodes: int = 1,
           node_rank: int = 0, coordinator: str | None = None) -> int:
    """Run `cmd` as `nproc` local processes (process ids node_rank * nproc + i of nnodes * nproc)."""
    import os
    import signal
    import subprocess
    import threading
    import time

    from .sharding.distributed import ENV_VARS, _check_address

    def bad(msg):
        return SystemExit(f"jaxllm launch: {msg}")

    cmd = cmd[1:] if cmd[:1] == ["--"] else cmd
    if not cmd:
        raise bad("give the COMMAND to run, e.g. jaxllm launch --nproc 2 python app.py")
    if nproc < 1:
        raise bad(f"--nproc must be >= 1, got {nproc}")
    if nnodes < 1:
        raise bad(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise bad(f"--node-rank must be in [0, {nnodes - 1}], got {node_rank}")
    if coordinator_port is not None and not 1 <= coordinator_port <= 65535:
        raise bad(f"--coordinator-port must be in [1, 65535], got {coordinator_port}")
    if coordinator is not None and coordinator_port is not None:
        raise bad("give --coordinator HOST:PORT or --coordinator-port, not both")
    if coordinator is None and nnodes > 1:
        raise bad("--coordinator HOST:PORT (node 0's address) is needed when --nnodes > 1")
    if coordinator is not None:
        try:
            _check_address("--coordinator", coordinator)
        except ValueError as e:
            raise bad(str(e)) from None
    address = coordinator or f"127.0.0.1:{coordinator_port or _free_port()}"

    lock = threading.Lock()
    procs, readers = [], []
    stopped: list[int] = []

    def on_signal(signum, frame):
        raise _Stopped(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(nproc):
            rank = node_rank * nproc + i
            env = dict(os.environ, **{ENV_VARS["coordinator_address"]: address,
                                      ENV_VARS["num_processes"]: str(nnodes * nproc),
                                      ENV_VARS["process_id"]: str(rank)})
            # a session of its own: the launcher alone decides when a process is stopped
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
            procs.append(p)
            for stream, sink in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
                t = threading.Thread(target=_forward, args=(stream, sink, f"[{rank}] ".encode(), lock), daemon=True)
                t.start()
                readers.append(t)
        status = 0
        while any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            if failed is not None:
                status = _exit_status(failed.returncode)
                break
            time.sleep(0.1)
        else:
            status = next((_exit_status(p.returncode) for p in procs if p.returncode != 0), 0)
    except _Stopped as e:
        stopped.append(e.signum)
        status = 128 + e.signum
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        _stop_all(procs)
        for t in readers:
            t.join(timeout=5)
    if status:
        why = f"signal {stopped[0]}" if stopped else f"a process exited with status {status}"
        print(f"jaxllm launch: stopped all processes ({why})", file=sys.stderr, flush=True)
    return status


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
    srv.add_argument("--precompile-max-len", type=int, default=0,
                     help="before serving, compile the step programs for requests of up to this many tokens "
                          "(prompt + output) so none waits on a compilation (LLM.precompile; 0: off)")
    srv.add_argument("--precompile-sampling", choices=["both", "greedy", "sampled"], default="both",
                     help="which batches --precompile-max-len prepares: all-greedy ones, sampling ones, or both")
    bench.add_llm_arguments(srv)
    srv.add_argument("--coordinator-address", default=None, help="several processes: process 0's HOST:PORT "
                     "(default: $JAXLLM_COORDINATOR_ADDRESS, or detected under srun / mpirun)")
    srv.add_argument("--num-processes", type=int, default=None, help="default: $JAXLLM_NUM_PROCESSES or detected")
    srv.add_argument("--process-id", type=int, default=None, help="default: $JAXLLM_PROCESS_ID or detected")
    lau = sub.add_parser("launch", help="run COMMAND as N processes of one jax.distributed job on this machine",
                         description=LAUNCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    lau.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    lau.add_argument("--coordinator-port", type=int, default=None, help="process 0's coordinator port (default: a free one)")
    lau.add_argument("--nnodes", type=int, default=1, help="machines, each running this launcher (default 1)")
    lau.add_argument("--node-rank", type=int, default=0, help="this machine's index in [0, nnodes - 1]")
    lau.add_argument("--coordinator", default=None, help="HOST:PORT of node 0's first process (needed when nnodes > 1)")
    lau.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="the program and its arguments")
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
    if args.command == "launch":
        return launch(args.cmd, args.nproc, args.coordinator_port, args.nnodes, args.node_rank, args.coordinator)
    parser.print_help(sys.stderr)
    return 2
