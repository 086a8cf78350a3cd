"""The OpenAI-compatible server: the official openai client against a live server on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from jaxllm import SamplingParams  # noqa: E402
from jaxllm.serve import build_app  # noqa: E402

NAME = "tiny"
KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_llm):
    srv = Server(build_app(tiny_llm, NAME, api_key=KEY, max_body_bytes=64 * 1024))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_completions_streamed_equals_whole(client, tiny_llm):
    kw = dict(model=NAME, prompt="The capital of France is", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    expected = tiny_llm.generate(kw["prompt"], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert whole.choices[0].text == expected.outputs[0].text
    assert whole.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_streamed_equals_whole(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=10,
              temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices(client):
    out = client.completions.create(model=NAME, prompt="Hi", max_tokens=5, temperature=1.0, n=3, seed=4)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]


def test_auth(server):
    import httpx

    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("field, value, param", [
    ("temperature", -1, "temperature"), ("n", 0, "n"), ("max_tokens", 0, "max_tokens"), ("suffix", "x", "suffix"),
])
def test_bad_fields_are_400_naming_the_field(client, field, value, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="Hi", **{field: value})
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and param in info.value.body["message"]


def test_oversized_prompt_and_body(client, server, tiny_llm):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt=[5] * (tiny_llm.max_seq_len + 1), max_tokens=4)
    assert "max_seq_len" in info.value.body["message"]
    import httpx

    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": NAME, "prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_concurrency_cap_is_429(tiny_llm):
    """With a cap of 1 and one request that never ends (a stub engine), the next is refused."""
    import httpx

    from jaxllm.engine import RequestHandle

    class StuckLLM:
        tokenizer = tiny_llm.tokenizer

        def generate_async(self, prompt, sp, streaming=False):
            handle = RequestHandle(0, streaming, engine=None)
            handle.abort = lambda: None
            return handle

    srv = Server(build_app(StuckLLM(), NAME, max_concurrent_requests=1))
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", srv.url + "/v1/completions",
                             json={"model": NAME, "prompt": "Hello", "stream": True}) as first:
                assert first.status_code == 200
                r = http.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        srv.stop()


def test_client_disconnect_frees_blocks(server, tiny_llm):
    import httpx

    engine = tiny_llm._engine
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert engine.blocks.num_used > 0
    deadline = time.time() + 30
    while engine.blocks.num_used > 0 or engine.scheduler.has_work:
        assert time.time() < deadline, "the disconnected request still holds KV blocks"
        time.sleep(0.1)


def test_200_concurrent_streams_all_complete(server, tiny_llm):
    prompts = [f"Request number {i} says" for i in range(200)]
    expected = [o.outputs[0].text for o in tiny_llm.generate(
        prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(p):
            text = ""
            async for c in await aclient.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0,
                                                            stream=True, extra_body={"ignore_eos": True}):
                text += c.choices[0].text if c.choices else ""
            return text

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=300)
        finally:
            await aclient.close()

    assert asyncio.run(run()) == expected


def test_logprobs_and_metrics(client, server, tiny_llm):
    import httpx

    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    expected = tiny_llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, logprobs=2), use_tqdm=False)
    comp = expected.outputs[0]
    assert lp.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)], abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs) and "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("jaxllm_requests_total", "jaxllm_prompt_tokens_total", "jaxllm_generation_tokens_total",
                 "jaxllm_time_to_first_token_seconds_bucket", "jaxllm_time_per_output_token_seconds_count",
                 "jaxllm_requests_running", "jaxllm_kv_blocks_used", "jaxllm_kv_blocks_free"):
        assert name in text, name
    done = [line for line in text.splitlines() if line.startswith('jaxllm_requests_total{outcome="length"}')]
    assert done and float(done[0].split()[-1]) >= 2
    decode = [line for line in text.splitlines() if line.startswith('jaxllm_engine_phase_seconds{phase="decode_call"}')]
    assert decode and float(decode[0].split()[-1]) > 0  # the engine's time, part by part


def test_sigterm_stops_the_server(tiny_checkpoints):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "serve", str(tiny_checkpoints["llama3"]), "--port",
                             str(port), "--max-seq-len", "128", "--max-batch-size", "4", "--precompile-max-len", "32",
                             "--precompile-sampling", "greedy"],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert re.search(r"compiled \d+ step programs", proc.stdout.read())  # --precompile-max-len ran
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serving(server, tmp_path):
    import json

    from jaxllm.cli import main

    path = tmp_path / "serving.json"
    rc = main(["bench", "serving", "--base-url", server.url, "--model", NAME, "--api-key", KEY, "--num-prompts", "16",
               "--input-len", "8", "--output-len", "5", "--vocab", "1000", "--request-rate", "40",
               "--max-concurrency", "6", "--report-json", str(path)])
    r = json.loads(path.read_text())
    assert rc == 0 and r["completed"] == r["requests"] == 16 and r["failed"] == 0
    assert r["output_tok_s"] == pytest.approx(16 * 5 / r["seconds"], rel=1e-6)
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
        assert 0 < r[key]["p50"] <= r[key]["p99"]
    assert r["ttft_s"]["p50"] <= r["e2e_latency_s"]["p50"]


def test_streamed_logprobs_equal_whole(client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=6, temperature=0, logprobs=1)
    whole = client.completions.create(**kw).choices[0].logprobs
    streamed = []
    for c in client.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].logprobs is not None:
            streamed += c.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(whole.token_logprobs, abs=1e-6)


def test_refused_prompt_refuses_the_whole_request(client, tiny_llm):
    engine = tiny_llm._engine
    t0 = time.time()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=["fine", [5] * (tiny_llm.max_seq_len + 5)], max_tokens=200,
                                  extra_body={"ignore_eos": True})
    deadline = time.time() + 30
    while engine.scheduler.has_work or engine.blocks.num_used:
        assert time.time() < deadline, "the accepted first prompt kept running"
        time.sleep(0.05)
    made = sum(r["new_tokens"] for r in tiny_llm.get_stats() if r["time"] >= t0)
    assert made < 200, f"the first prompt ran to its end ({made} tokens) although the request was refused"


def test_bad_messages_are_400(server):
    import httpx

    for messages in ([], [{"role": "user"}], "hello"):
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": NAME, "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "messages must be" in r.json()["error"]["message"]
