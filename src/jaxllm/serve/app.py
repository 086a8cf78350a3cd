"""The OpenAI-compatible HTTP API over one LLM (FastAPI; run by ``jaxllm serve``).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends
server-sent events ending with ``data: [DONE]``; ``logprobs`` in OpenAI's shapes, per chunk
when streaming), ``GET /v1/models``, ``GET /health``, ``GET /version``, ``GET /metrics`` (Prometheus). Request fields map onto SamplingParams; unknown fields are ignored (as OpenAI's
own server does for fields it does not know), fields jaxllm cannot honour (``suffix``,
``echo``, ``logit_bias``, ``tools``) are rejected with 400. Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Safety: with an API key, every route but /health needs ``Authorization: Bearer KEY`` (401);
bodies over ``max_body_bytes`` get 413; past ``max_concurrent_requests`` running requests, 429
with Retry-After; a bad field or a prompt that cannot fit, 400 naming it. A streaming client that
disconnects has its request aborted, which frees its KV blocks.
"""

import dataclasses
import json
import time
import uuid
from typing import Any

from .. import __version__
from ..sampling_params import SamplingParams

REJECTED = ("suffix", "echo", "logit_bias", "tools", "tool_choice", "functions", "function_call")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(status: int, message: str, param=None, kind="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _sampling_params(body: dict, chat: bool) -> SamplingParams:
    for name in REJECTED:
        if body.get(name) not in (None, False, [], {}):
            raise APIError(400, f"{name} is not supported by this server", name)
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens", None if chat else 16)
    logprobs = body.get("logprobs")
    if chat:  # chat: logprobs is a bool, top_logprobs the count
        logprobs = (body.get("top_logprobs") or 0) if logprobs else None
    kw: dict[str, Any] = dict(
        temperature=body.get("temperature"), top_p=body.get("top_p"), n=body.get("n", 1), stop=body.get("stop"),
        seed=body.get("seed"), logprobs=logprobs, presence_penalty=body.get("presence_penalty", 0.0),
        frequency_penalty=body.get("frequency_penalty", 0.0), best_of=body.get("best_of"),
        top_k=body.get("top_k"), min_p=body.get("min_p"), min_tokens=body.get("min_tokens"),
        repetition_penalty=body.get("repetition_penalty", 1.0), ignore_eos=body.get("ignore_eos", False),
        stop_token_ids=body.get("stop_token_ids"),
    )
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    if kw["temperature"] is None:
        kw["temperature"] = 1.0  # OpenAI's default
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        param = str(e).split(" ")[0]
        raise APIError(400, str(e), param) from None


def build_app(llm, served_model_name: str, api_key: str | None = None, max_concurrent_requests: int = 512,
              max_body_bytes: int = 4 * 2**20, retry_after_s: int = 1):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="jaxllm", version=__version__)
    state = {"running": 0}
    metrics = _Metrics(llm)

    def err(status, message, param=None, kind="invalid_request_error", headers=None):
        return JSONResponse(_error_body(status, message, param, kind), status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return err(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body_bytes:
            return err(413, f"request body over {max_body_bytes} bytes", kind="request_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"Retry-After": str(retry_after_s)} if exc.status == 429 else None
        return err(exc.status, exc.message, exc.param, exc.kind, headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        from fastapi.responses import Response

        return Response(metrics.render(state["running"]), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                             "owned_by": "jaxllm"}]}

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", kind="request_too_large")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {served_model_name!r}", "model",
                           "not_found_error")
        return body

    def submit(prompts: list, sp: SamplingParams, stream: bool):
        if state["running"] + len(prompts) > max_concurrent_requests:
            raise APIError(429, f"more than {max_concurrent_requests} requests at once; retry later",
                           kind="rate_limit_error")
        handles = []
        try:
            for p in prompts:
                handles.append(llm.generate_async(p, sp, streaming=stream))
        except (ValueError, TypeError) as e:
            for h in handles:  # a later prompt was refused: the whole request is, nothing keeps running
                h.abort()
            raise APIError(400, str(e), "prompt" if "prompt" in str(e) else None) from None
        state["running"] += len(handles)
        return handles

    def usage(outs) -> dict:
        p = sum(len(o.prompt_token_ids) for o in outs)
        c = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(request: Request, body: dict, prompts: list, chat: bool):
        sp = _sampling_params(body, chat)
        stream = bool(body.get("stream", False))
        handles = submit(prompts, sp, stream)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(i_prompt, c, text, final):
            index = i_prompt * sp.n + c.index
            lps = None
            if c.logprobs is not None:  # whole: every token; a stream chunk: its new tokens
                part = c if final else dataclasses.replace(
                    c, token_ids=c.token_ids_diff, logprobs=c.logprobs[len(c.token_ids) - len(c.token_ids_diff):])
                lps = _logprobs(part, chat, sp.logprobs)
            if chat:
                key = "message" if final else "delta"
                content = {"role": "assistant", "content": text} if final else {"content": text}
                return {"index": index, key: content, "finish_reason": c.finish_reason, "logprobs": lps}
            return {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": lps}

        if not stream:
            outs = []
            try:
                for h in handles:
                    outs.append(await h.aresult())
            finally:
                state["running"] -= len(handles)
                metrics.record(outs, len(handles) - len(outs))
            choices = [choice(i, c, c.text, True) for i, o in enumerate(outs) for c in o.outputs]
            return {"id": rid, "object": obj, "created": created, "model": served_model_name, "choices": choices,
                    "usage": usage(outs)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            finals = []
            try:
                if chat:
                    for i in range(len(handles) * sp.n):
                        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": served_model_name,
                                    "choices": [first]})
                for i, h in enumerate(handles):
                    last = None
                    async for out in h:
                        last = out
                        for c in out.outputs:
                            if c.text_diff or c.finish_reason:
                                yield _sse({"id": rid, "object": chunk_obj, "created": created,
                                            "model": served_model_name,
                                            "choices": [choice(i, c, c.text_diff, False)]})
                        if await request.is_disconnected():
                            return  # the finally below aborts what still runs
                    finals.append(last)
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": served_model_name,
                                "choices": [], "usage": usage(finals)})
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away: nothing of ours keeps running
                for h in handles:
                    if not h.finished:
                        h.abort()
                state["running"] -= len(handles)
                metrics.record([f for f in finals if f is not None], len(handles) - len(finals))

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = list(prompt)
        else:
            raise APIError(400, "prompt must be a non-empty string, a list of token ids, or a list of these", "prompt")
        return await respond(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        try:
            prompt = llm.chat_prompt(body.get("messages"))
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 - a template error is the client's input
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        return await respond(request, body, [prompt], chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _logprobs(c, chat: bool, k: int) -> dict:
    """OpenAI's logprobs object for a finished completion (chat: "content" entries; completions:
    the legacy tokens / token_logprobs / top_logprobs lists)."""
    def text(entry, t):
        return entry[t].decoded_token if entry[t].decoded_token is not None else str(t)

    rows = list(zip(c.token_ids, c.logprobs))
    if chat:
        return {"content": [{
            "token": text(e, t), "logprob": e[t].logprob, "bytes": list(text(e, t).encode()),
            "top_logprobs": [{"token": text(e, u), "logprob": e[u].logprob, "bytes": list(text(e, u).encode())}
                             for u in sorted(e, key=lambda u: e[u].rank) if e[u].rank <= k],
        } for t, e in rows]}
    offsets, pos = [], 0
    for t, e in rows:
        offsets.append(pos)
        pos += len(text(e, t))
    return {"tokens": [text(e, t) for t, e in rows], "token_logprobs": [e[t].logprob for t, e in rows],
            "top_logprobs": [{text(e, u): e[u].logprob for u in e if e[u].rank <= k} for t, e in rows],
            "text_offset": offsets}


class _Metrics:
    """Prometheus metrics of this server (its own registry, so several apps never collide)."""

    def __init__(self, llm):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.llm = llm
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxllm_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("jaxllm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("jaxllm_generation_tokens", "Generated tokens", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("jaxllm_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r)
        self.tpot = Histogram("jaxllm_time_per_output_token_seconds", "TPOT", buckets=buckets, registry=r)
        self.running = Gauge("jaxllm_requests_running", "Requests in flight on this server", registry=r)
        self.waiting = Gauge("jaxllm_requests_waiting", "Requests waiting in the engine", registry=r)
        self.kv_used = Gauge("jaxllm_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_free = Gauge("jaxllm_kv_blocks_free", "KV blocks free", registry=r)
        self.phase_seconds = Gauge("jaxllm_engine_phase_seconds", "Engine thread seconds in each part of its step "
                                   "since start (a device wait counts where the host blocks on it)", ["phase"],
                                   registry=r)

    def record(self, outs, failed: int = 0) -> None:
        if failed:
            self.requests.labels("error").inc(failed)
        for o in outs:
            for c in o.outputs:
                self.requests.labels(c.finish_reason or "unfinished").inc()
                self.generation_tokens.inc(len(c.token_ids))
            self.prompt_tokens.inc(len(o.prompt_token_ids))
            m = o.metrics
            if m is not None and m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
                n = max(len(c.token_ids) for c in o.outputs)
                if m.finished_time is not None and n > 1:
                    self.tpot.observe((m.finished_time - m.first_token_time) / (n - 1))

    def render(self, running: int) -> bytes:
        from prometheus_client import generate_latest

        self.running.set(running)
        stats = self.llm.get_stats() if hasattr(self.llm, "get_stats") else []
        if stats:
            last = stats[-1]
            self.waiting.set(last["waiting"])
            self.kv_used.set(last["kv_blocks_used"])
            self.kv_free.set(last["kv_blocks_free"])
        if hasattr(self.llm, "get_phase_times"):
            for phase, v in self.llm.get_phase_times().items():
                self.phase_seconds.labels(phase).set(v["seconds"])
        return generate_latest(self.registry)
