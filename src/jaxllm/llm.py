"""The facade: ``LLM(model=...)`` and ``generate``, with every argument checked before work starts."""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .engine import Engine, GroupHandle, Request, RequestHandle
from .kv_cache_config import KvCacheConfig
from .loader import DTYPES, LOAD_FORMATS, QUANTIZATIONS, load_model, save_checkpoint
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .runner import ATTENTION_BACKENDS, ModelRunner, device_memory, plan_num_blocks
from .runner.paged import is_fp8
from .sampling import fold_key_data, key_data_for_seed
from .sampling_params import SamplingParams, _check_int
from .sharding import make_meshes, replicate_on
from .sharding.distributed import maybe_initialize


PromptInput = str | list[int] | dict

# LLMs not yet shut down: stopped at interpreter exit, so a program that never calls shutdown()
# still exits promptly (the engine thread is a daemon too).
_LIVE: "weakref.WeakSet[LLM]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for llm in list(_LIVE):
        llm.shutdown()


def _enable_compilation_cache(setting) -> None:
    import jax

    if setting is False or jax.config.jax_compilation_cache_dir:
        return
    if setting is True:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxllm" / "xla"
        setting = os.environ.get("JAXLLM_CACHE_DIR", default)
    elif not isinstance(setting, (str, os.PathLike)):
        raise TypeError(f"compilation_cache must be True, False or a directory path, got {setting!r}")
    path = Path(setting).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program, not only those that took >= 1 s: start-up compiles many small ones
    # (parameter initialisation, pool set-up, sampling variants) whose sum is what a warm start saves
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _check_positive_int(name: str, value, allow_none=True):
    _check_int(name, value, 1, allow_none)


class LLM:
    """An LLM loaded on the local devices, ready to generate.

    Args:
        model: an HF model id ("org/name", downloaded through huggingface_hub), a local HF folder
            (safetensors), or a .gguf file.
        tokenizer: a folder, .gguf file or HF id to take the tokenizer from, or a tokenizer object.
        dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32".
        revision: the hub revision (branch, tag or commit) for an HF id.
        load_format: "auto" (read the weights) or "dummy" (random weights of the right shapes).
        max_seq_len: the longest prompt + output, default the model's max_position_embeddings.
        max_batch_size: how many requests run on device together.
        max_num_tokens: prompt tokens prefilled per engine step (longer prompts go in chunks).
        kv_cache_config: the paged KV pool's size and block size (KvCacheConfig).
        decode_steps: decode steps per device call (tokens per host round trip).
        tensor_parallel_size: devices to split the model over (heads, MLP and vocabulary), on one
            host; XLA's SPMD partitioner inserts the collectives.
        data_parallel_size: model replicas (each on tensor_parallel_size devices, with its own KV
            pool and batch slots); requests are spread over them in turn.
        pipeline_parallel_size: must be 1 (not supported).
        compilation_cache: JAX's persistent compilation cache: True (default) keeps compiled
            programs in $JAXLLM_CACHE_DIR or ~/.cache/jaxllm/xla, a path keeps them there, False
            leaves JAX's setting alone. A cache directory the process already set is kept.
        trust_remote_code: must stay False: code from checkpoints is never executed.
        attention_backend: "auto" (the Pallas decode kernel on NVIDIA GPUs, the jnp reference
            elsewhere), "pallas" (an error where the kernel cannot run) or "reference".
        quantization: weight-only quantization of the attention and MLP projections (not the
            embedding or lm_head), done on the devices at load: None, "fp8" (float8_e4m3fn) or
            "int8", with a float32 scale per output channel; the matmuls dequantize inside the dot.
            "fp8-w8a8": fp8 weights, and calls of 64 tokens or more (prefill, large decode batches)
            also quantize the activations per token and multiply FP8 x FP8 (cuBLASLt's FP8 GEMM on
            Hopper; less accurate than weight-only: see BENCHMARKS.md).
            A pre-quantized checkpoint (compressed-tensors or ModelOpt FP8) is detected from the
            checkpoint itself and loads as "fp8" with None (or "fp8-w8a8"); FP4 and other quantized
            formats are refused. ``LLM.save`` keeps the quantized weights.
        coordinator_address, num_processes, process_id: start ``jax.distributed`` for several
            processes ("HOST:PORT" of process 0's coordinator, the process count >= 1, this
            process's id in [0, num_processes - 1]); unset ones come from $JAXLLM_COORDINATOR_ADDRESS,
            $JAXLLM_NUM_PROCESSES, $JAXLLM_PROCESS_ID, else from Slurm (srun) or Open MPI (mpirun)
            through JAX's cluster detection; none of these: one process. Done before any JAX call,
            skipped if jax.distributed is already initialized (docs/launching.md).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        tokenizer: Any = None,
        *,
        dtype: str = "auto",
        revision: str | None = None,
        load_format: str = "auto",
        max_seq_len: int | None = None,
        max_batch_size: int = 256,
        max_num_tokens: int = 8192,
        kv_cache_config: KvCacheConfig | None = None,
        decode_steps: int = 16,
        compilation_cache: bool | str | os.PathLike = True,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        trust_remote_code: bool = False,
        attention_backend: str = "auto",
        quantization: str | None = None,
        coordinator_address: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
    ):
        if trust_remote_code:
            raise ValueError(
                "trust_remote_code=True is not supported: jaxllm never runs code shipped with a "
                "checkpoint; use a supported architecture (see jaxllm.models.supported_architectures())"
            )
        if dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
        _check_positive_int("max_seq_len", max_seq_len)
        _check_positive_int("max_batch_size", max_batch_size, allow_none=False)
        _check_positive_int("max_num_tokens", max_num_tokens, allow_none=False)
        _check_positive_int("decode_steps", decode_steps, allow_none=False)
        _check_positive_int("tensor_parallel_size", tensor_parallel_size, allow_none=False)
        if pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size must be 1 (pipeline parallelism is not supported), got {pipeline_parallel_size!r}")
        _check_positive_int("data_parallel_size", data_parallel_size, allow_none=False)
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {attention_backend!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
        kv_cache_config = KvCacheConfig() if kv_cache_config is None else kv_cache_config
        if not isinstance(kv_cache_config, KvCacheConfig):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig, got {type(kv_cache_config).__name__}")

        maybe_initialize(coordinator_address, num_processes, process_id)  # before any JAX backend starts
        import jax

        if data_parallel_size != 1 and jax.process_count() > 1:
            raise ValueError(
                f"data_parallel_size must be 1 with several processes (not supported yet; this is one of "
                f"{jax.process_count()}), got {data_parallel_size}"
            )
        t_start = time.perf_counter()
        _enable_compilation_cache(compilation_cache)
        meshes = make_meshes(tensor_parallel_size, data_parallel_size)
        self._mesh = meshes[0]
        loaded = load_model(
            model, dtype=dtype, load_format=load_format, tokenizer=tokenizer, revision=revision, mesh=self._mesh,
            quantization=quantization,
        )
        t_loaded = time.perf_counter()
        self.model_config = loaded.config
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self._eos_ids = self._find_eos_ids(loaded)

        kv_dtype = kv_cache_config.pool_dtype(loaded.dtype)
        block = kv_cache_config.tokens_per_block
        num_blocks = plan_num_blocks(loaded.config, kv_dtype, block, kv_cache_config, self._mesh)
        self.memory_at_kv_planning = device_memory(self._mesh)  # what the pool was planned from
        self.kv_capacity_tokens = num_blocks * block
        limit = loaded.config.max_position_embeddings
        if max_seq_len is not None and max_seq_len > limit:
            raise ValueError(f"max_seq_len must be <= the model's max_position_embeddings ({limit}), got {max_seq_len}")
        if max_seq_len is not None and max_seq_len > self.kv_capacity_tokens:
            raise ValueError(
                f"max_seq_len must be <= the KV pool's capacity ({self.kv_capacity_tokens} tokens), got "
                f"{max_seq_len}; enlarge KvCacheConfig(max_tokens=..., free_gpu_memory_fraction=...)"
            )
        self.max_seq_len = max_seq_len or min(limit, self.kv_capacity_tokens)
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        # One engine per data-parallel replica, each with its own copy of the weights on its own
        # devices, its own KV pool and batch slots; requests are spread over them.
        self._engines: list[Engine] = []
        for mesh in meshes:
            model = loaded.model if mesh is meshes[0] else replicate_on(loaded.model, mesh)
            runner = ModelRunner(
                model, loaded.config, loaded.dtype, num_blocks, block, mesh, kv_dtype, attention_backend,
                kv_scales=loaded.kv_scales if is_fp8(kv_dtype) else None,  # a checkpoint's static FP8 KV scales
            )
            engine = Engine(
                runner,
                self.tokenizer,
                max_batch_size=max_batch_size,
                max_num_tokens=max_num_tokens,
                max_seq_len=self.max_seq_len,
                decode_steps=decode_steps,
                enable_block_reuse=kv_cache_config.enable_block_reuse,
            )
            self._engines.append(engine)
        # where LLM() spent its time (seconds): the weights (read or initialised, placed), the rest
        self.startup_seconds = {"load_model": t_loaded - t_start, "engines": time.perf_counter() - t_loaded}
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._seed_rng = np.random.default_rng()  # seeds for requests that set none
        _LIVE.add(self)
        # Several hosts (jax.distributed): process 0 takes the requests; every other process makes
        # the same device calls, here, until process 0 shuts down.
        self.follower = self._engine.runner._mirror is not None and not self._engine.runner._mirror.is_leader
        if self.follower:
            try:
                self._engine.runner.follow()
            finally:
                self.shutdown()

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine threads and free device memory; in-flight requests end "cancelled"."""
        engines, self._engines = self._engines, []
        for engine in engines:
            engine.shutdown()
            engine.runner.release()
        _LIVE.discard(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the converted parameters (Orbax), config and tokenizer into a new folder;
        ``LLM(model=path)`` restores them onto any tensor-parallel layout, skipping conversion."""
        engine = self._require_engine()
        from .models.llama import unfused_qkv_dict

        params = unfused_qkv_dict(engine.runner.params, self.model_config)
        save_checkpoint(Path(path), params, self.hf_config, self.tokenizer, self.dtype, self.model_config.quantization,
                        self.model_config.quantize_lm_head)

    def precompile(self, max_len: int | None = None, *, greedy: bool = True, sampled: bool = True,
                   min_len: int = 1, cached_prefixes: bool = True) -> dict:
        """Compile now, before any request, the step programs that requests of up to `max_len`
        tokens (prompt + output; default max_seq_len) will need -- decode for every batch bucket and
        block-table width, whole-prompt prefill for every batch x prompt-length bucket -- for
        all-greedy batches (`greedy`) and sampling ones (`sampled`). Serving then never waits on a
        compilation for those shapes (``jaxllm serve --precompile-max-len``). Costly the first time
        (many programs; they compile in parallel), cheap once the persistent compilation cache
        holds them. `min_len`: a lower bound on every prompt's length, which leaves out the shorter
        shapes (a benchmark of fixed-length prompts needs a fraction of the programs).
        `cached_prefixes`: also the prefill programs of prompts that continue a cached prefix (and
        of later chunks of long prompts) -- what serving with shared system prompts needs; a
        benchmark of random prompts can leave them out.
        Returns {"programs": n, "seconds": s}."""
        if max_len is None:
            max_len = self.max_seq_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= self.max_seq_len:
            raise ValueError(f"max_len must be an int in [1, max_seq_len={self.max_seq_len}], got {max_len!r}")
        if not (greedy or sampled):
            raise ValueError("precompile needs greedy=True or sampled=True (or both)")
        if isinstance(min_len, bool) or not isinstance(min_len, int) or not 1 <= min_len <= max_len:
            raise ValueError(f"min_len must be an int in [1, max_len={max_len}], got {min_len!r}")
        self._require_engine()
        done = [e.precompile(max_len, greedy, sampled, min_len=min_len, cached_prefixes=cached_prefixes)
                for e in self._engines]
        return {"programs": sum(d["programs"] for d in done), "seconds": sum(d["seconds"] for d in done)}

    def get_stats(self) -> list[dict]:
        """Recent per-step engine records: running / waiting requests, KV blocks used / free,
        preemptions and prefix-cache hit tokens (cumulative), new tokens, tokens per second.
        With data parallelism each record names its replica; records are in time order."""
        self._require_engine()
        records = [dict(r, replica=i) for i, e in enumerate(self._engines) for r in list(e.stats)]
        return sorted(records, key=lambda r: r["time"])

    def get_phase_times(self) -> dict[str, dict]:
        """Where the engine thread's time went since start (over all replicas): per part of its step
        (text, schedule, prefill / decode inputs, call, fetch, collect; see Engine.phase_seconds)
        {"seconds": total, "calls": times}, slowest first."""
        self._require_engine()
        total, calls = collections.Counter(), collections.Counter()
        for e in self._engines:
            total.update(e.phase_seconds)
            calls.update(e.phase_calls)
        return {p: {"seconds": s, "calls": calls[p]} for p, s in total.most_common()}

    def reset_phase_times(self) -> None:
        """Start get_phase_times' counts afresh (a benchmark's timed run, say)."""
        self._require_engine()
        for e in self._engines:
            e.phase_seconds.clear()
            e.phase_calls.clear()
            e.decode_loops.clear()

    @property
    def _engine(self) -> Engine | None:
        """The first replica's engine (the only one without data parallelism)."""
        return self._engines[0] if self._engines else None

    def _require_engine(self, request_id: int = 0) -> Engine:
        """The engine that serves request_id (replicas take requests in turn)."""
        if not self._engines:
            if getattr(self, "follower", False):
                raise RuntimeError("on several hosts only process 0 takes requests; this process followed "
                                   "process 0's device calls until it shut down")
            raise RuntimeError("this LLM has been shut down; create a new one")
        return self._engines[request_id % len(self._engines)]

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate completions; a list of RequestOutput for list input, else one RequestOutput.

        Every input is checked before any is submitted; all run together on the engine.
        """
        self._require_engine()
        prompts, single = self._normalize_inputs(inputs)
        params = self._normalize_params(sampling_params, len(prompts))
        groups = [self._make_requests(p, sp) for p, sp in zip(prompts, params)]  # all checked first
        handles = [self._submit(g, sp) for g, sp in zip(groups, params)]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(handles), desc="Generating", unit="req", leave=False)
        try:
            outputs = []
            for h in handles:
                outputs.append(h.result())
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return outputs[0] if single else outputs

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Generate the next turn of one conversation (a list of {"role", "content"} messages) or of
        a list of conversations, through the tokenizer's chat template (or `chat_template`)."""
        self._require_engine()
        single = isinstance(messages, (list, tuple)) and len(messages) > 0 and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise TypeError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
        inputs = [self.chat_prompt(conv, chat_template, add_generation_prompt) for conv in conversations]
        outputs = self.generate(inputs, sampling_params, use_tqdm)
        return outputs[0] if single else outputs

    def chat_prompt(self, conversation: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> dict:
        """The prompt (``{"prompt", "prompt_token_ids"}``) of one conversation through the chat
        template; TypeError / ValueError for messages or a tokenizer it cannot take."""
        if not isinstance(conversation, (list, tuple)) or not conversation or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conversation
        ):
            raise TypeError(f"messages must be lists of {{'role': str, 'content': str}} dicts, got {conversation!r}")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template= (a Jinja template string)")
        text = self.tokenizer.apply_chat_template(
            list(conversation), chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        # the template already holds BOS and the other special tokens
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def generate_async(
        self, inputs: PromptInput, sampling_params: SamplingParams | None = None, streaming: bool = False
    ) -> RequestHandle:
        """Submit one prompt; returns at once with a handle: ``h.result()``, ``await h.aresult()``,
        ``async for out in h`` (every step's partial output when streaming), ``h.abort()``."""
        self._require_engine()
        if isinstance(inputs, (list, tuple)) and not self._is_token_list(inputs):
            raise TypeError("generate_async takes one prompt (a str, a list of token ids or a dict); call it per prompt")
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        sp = sampling_params or SamplingParams()
        return self._submit(self._make_requests(inputs, sp, streaming=bool(streaming)), sp)

    # -- input handling ------------------------------------------------------------------------
    @staticmethod
    def _is_token_list(x) -> bool:
        return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    def _normalize_inputs(self, inputs) -> tuple[list, bool]:
        if isinstance(inputs, (str, dict)) or self._is_token_list(inputs):
            return [inputs], True
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 0:
                raise ValueError("inputs must not be empty")
            return list(inputs), False
        raise TypeError(
            "inputs must be a str, a list of token ids, a dict with 'prompt' or 'prompt_token_ids', "
            f"or a list of these; got {type(inputs).__name__}"
        )

    def _normalize_params(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != n:
                raise ValueError(
                    f"sampling_params must be one SamplingParams or one per prompt ({n}), got {len(sampling_params)}"
                )
            for sp in sampling_params:
                if not isinstance(sp, SamplingParams):
                    raise TypeError(f"sampling_params entries must be SamplingParams, got {type(sp).__name__}")
            return list(sampling_params)
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")

    def _tokenize(self, prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"a dict input needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def _check_ids(self, ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError("prompt_token_ids must be a non-empty list of int")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids must be ints in [0, {vocab}), got {t!r}")
        return list(ids)

    def _submit(self, reqs: list[Request], sp: SamplingParams) -> RequestHandle:
        """Queue one request's sequences; one handle (a GroupHandle merging them when several)."""
        if sp.use_beam_search:
            return self._submit_beam_search(reqs[0], sp)
        if sp.logits_processor is not None:
            return self._submit_processed(reqs[0])
        if len(reqs) == 1:
            return self._require_engine(reqs[0].request_id).add_request(reqs[0])
        group = GroupHandle(reqs[0].request_id, reqs[0].streaming, sp.n, len(reqs))
        for i, r in enumerate(reqs):
            group._children.append(self._require_engine(r.request_id).add_request(r, group.listener(i)))
        return group

    def _on_own_thread(self, req: Request, name: str, work) -> RequestHandle:
        """Run `work(runner, handle, cancelled)` for req on a thread of its own (the slower paths,
        outside the engine's batch); the handle's abort() sets `cancelled`."""
        handle = RequestHandle(req.request_id, req.streaming, engine=None)
        cancelled = threading.Event()
        handle.abort = cancelled.set
        runner = self._require_engine(req.request_id).runner
        threading.Thread(target=work, args=(runner, handle, cancelled), name=f"jaxllm-{name}-{req.request_id}",
                         daemon=True).start()
        return handle

    def _submit_processed(self, req: Request) -> RequestHandle:
        """A request with logits processors (see jaxllm.engine.logits_processing)."""
        from .engine.logits_processing import run_request

        def work(runner, handle, cancelled):
            req.handle = handle
            req.start_detokenizer(self.tokenizer)
            run_request(runner, req, cancelled)

        return self._on_own_thread(req, "lp", work)

    def _submit_beam_search(self, req: Request, sp: SamplingParams) -> RequestHandle:
        """Beam search (see jaxllm.engine.beam_search); abort() stops it between steps, and the
        best hypotheses so far are returned as "cancelled"."""
        from .engine.beam_search import beam_search
        from .engine.detokenizer import decode_text

        tok = self.tokenizer

        def work(runner, handle, cancelled):
            try:
                hyps = beam_search(
                    runner, req.prompt_token_ids, sp.beam_width, sp.max_tokens, req.stop_ids,
                    min_tokens=sp.min_tokens or 0, length_penalty=sp.length_penalty,
                    early_stopping=sp.early_stopping, cancelled=cancelled,
                )
                outs = []
                for i, h in enumerate(hyps[: sp.n]):
                    text = (decode_text(tok, h.tokens, sp.skip_special_tokens, sp.spaces_between_special_tokens)
                            if sp.detokenize and tok else "")
                    reason = "cancelled" if cancelled.is_set() else ("stop" if h.stopped_by_eos else "length")
                    stop_reason = h.tokens[-1] if h.stopped_by_eos and h.tokens[-1] in (sp.stop_token_ids or []) else None
                    outs.append(CompletionOutput(index=i, text=text, token_ids=h.tokens, cumulative_logprob=h.logprob,
                                                 finish_reason=reason, stop_reason=stop_reason, text_diff=text,
                                                 token_ids_diff=list(h.tokens)))
                if not outs:
                    outs = [CompletionOutput(index=0, finish_reason="cancelled")]
                now = time.perf_counter()
                metrics = RequestMetrics(req.arrival_time, now, now)
                handle._publish(RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, True, metrics))
            except BaseException as e:  # noqa: BLE001 - the caller must hear of it
                handle._publish(error=e)

        return self._on_own_thread(req, "beam", work)

    def _make_requests(self, prompt, sp: SamplingParams, streaming: bool = False) -> list[Request]:
        """The engine requests of one prompt: one per sequence (best_of, default n), checked."""
        first = self._make_request(prompt, sp, streaming)
        if sp.num_sequences == 1 or sp.use_beam_search:
            return [first]
        reqs = [first]
        for i in range(1, sp.num_sequences):
            with self._id_lock:
                rid = self._next_id
                self._next_id += 1
            key = fold_key_data(first.key_data, i)
            reqs.append(Request(rid, first.prompt, first.prompt_token_ids, sp, key, first.stop_ids, streaming=streaming,
                                bad_ids=first.bad_ids, bad_seqs=first.bad_seqs))
        return reqs

    def _make_request(self, prompt, sp: SamplingParams, streaming: bool = False) -> Request:
        text, ids = self._tokenize(prompt, sp.add_special_tokens)
        if not ids:
            raise ValueError("prompt must not be empty (it tokenized to no tokens)")
        if sp.truncate_prompt_tokens is not None:
            ids = ids[-sp.truncate_prompt_tokens :]  # keep the last tokens, nearest the output
        vocab = self.model_config.vocab_size
        for t in sp.stop_token_ids or []:
            if t >= vocab:
                raise ValueError(f"stop_token_ids must be ints in [0, {vocab}), got {t}")
        for t in sp.bad_token_ids or []:
            if t >= vocab:
                raise ValueError(f"bad_token_ids must be ints in [0, {vocab}), got {t}")
        bad_ids, bad_seqs = self._bad_words(sp)
        if sp.end_id is not None and sp.end_id >= vocab:
            raise ValueError(f"end_id must be in [0, {vocab}), got {sp.end_id}")
        total = len(ids) + sp.max_tokens
        if total > self.max_seq_len:  # (max_seq_len never exceeds the KV pool, so it always fits)
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) = {total} exceeds "
                f"max_seq_len ({self.max_seq_len}); shorten the prompt or lower max_tokens"
            )
        with self._id_lock:
            seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(0, 2**31 - 1))
            rid = self._next_id
            self._next_id += 1
        return Request(
            rid, text, ids, sp, key_data_for_seed(seed), sp.all_stop_token_ids(self._eos_ids), streaming=streaming,
            bad_ids=bad_ids, bad_seqs=bad_seqs,
        )

    def _bad_words(self, sp: SamplingParams) -> tuple[list[int], list[list[int]]]:
        """bad_token_ids and the token sequences of the bad words (as written and after a space)."""
        ids, seqs = set(sp.bad_token_ids or []), []
        if sp.bad_words and self.tokenizer is None:
            raise ValueError("bad words need a tokenizer; pass bad_token_ids instead")
        for word in sp.bad_words:
            for text in (word, " " + word.lstrip()):
                toks = list(self.tokenizer.encode(text, add_special_tokens=False))
                if len(toks) == 1:
                    ids.add(toks[0])
                elif toks and toks not in seqs:
                    seqs.append(toks)
        return sorted(ids), seqs

    @staticmethod
    def _find_eos_ids(loaded) -> list[int]:
        ids = list(loaded.config.eos_token_ids)
        gen_cfg = loaded.source.path / "generation_config.json" if not loaded.source.is_gguf else None
        if gen_cfg is not None and gen_cfg.exists():
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(str(loaded.source.path)).eos_token_id
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        tok_eos = getattr(loaded.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.append(tok_eos)
        return sorted(set(int(i) for i in ids))
