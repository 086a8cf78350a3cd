"""The engine: requests in, finished outputs out.

This first engine runs static batches: up to ``max_batch_size`` requests are prefilled together
(prompts of different lengths, right-padded), then decoded in multi-step device calls until every
row is done, then the next wave starts. Continuous batching and the paged KV pool replace the
wave loop later; the request / output bookkeeping here stays.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..outputs import CompletionOutput, RequestOutput
from ..runner import DecodeState, ModelRunner, bucket
from ..sampling import SamplingArrays
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer, find_stop


@dataclass
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: list[int]  # token ids that end it (EOS unless ignore_eos, and stop_token_ids)
    output: CompletionOutput = field(default_factory=lambda: CompletionOutput(index=0))
    detok: IncrementalDetokenizer | None = None

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[self.output],
            finished=self.finished,
        )


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, max_batch_size: int, max_seq_len: int, decode_steps: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.decode_steps = decode_steps

    def run(self, requests: list[Request], on_finish: Callable[[Request], None] | None = None) -> None:
        for i in range(0, len(requests), self.max_batch_size):
            self._run_wave(requests[i : i + self.max_batch_size], on_finish)

    # ------------------------------------------------------------------------------------
    def _run_wave(self, reqs: list[Request], on_finish) -> None:
        vocab = self.runner.cfg.vocab_size
        n = len(reqs)
        b = bucket(n, 1, self.max_batch_size)
        t = bucket(max(len(r.prompt_token_ids) for r in reqs), 16, self.max_seq_len)
        s = bucket(max(len(r.prompt_token_ids) + r.params.max_tokens for r in reqs), 32, self.max_seq_len)
        k = bucket(max([len(r.stop_ids) for r in reqs] + [1]), 4)

        tokens = np.zeros((b, t), np.int32)
        prompt_lens = np.ones((b,), np.int32)
        stop_ids = np.full((b, k), vocab, np.int32)
        max_tokens = np.ones((b,), np.int32)
        min_tokens = np.zeros((b,), np.int32)
        done = np.ones((b,), np.bool_)
        rows = []
        for i, r in enumerate(reqs):
            p = r.params
            tokens[i, : len(r.prompt_token_ids)] = r.prompt_token_ids
            prompt_lens[i] = len(r.prompt_token_ids)
            stop_ids[i, : len(r.stop_ids)] = r.stop_ids
            max_tokens[i] = p.max_tokens
            min_tokens[i] = p.min_tokens or 0
            done[i] = False
            rows.append(
                dict(
                    greedy=p.is_greedy,
                    temperature=1.0 if p.temperature is None else p.temperature,
                    top_k=p.top_k or 0,
                    top_p=1.0 if p.top_p is None else p.top_p,
                    min_p=p.min_p or 0.0,
                    seed=r.seed,
                )
            )
            if p.detokenize:
                r.detok = IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, p.skip_special_tokens)
            r.output.cumulative_logprob = 0.0

        state = DecodeState(
            tokens=jnp.zeros((b,), jnp.int32),
            positions=jnp.zeros((b,), jnp.int32),
            num_generated=jnp.zeros((b,), jnp.int32),
            max_tokens=jnp.asarray(max_tokens),
            min_tokens=jnp.asarray(min_tokens),
            stop_ids=jnp.asarray(stop_ids),
            done=jnp.asarray(done),
            sampling=SamplingArrays.build(rows, b),
        )
        cache, state, tok, logprob = self.runner.prefill(jnp.asarray(tokens), jnp.asarray(prompt_lens), state, s)
        tok, logprob, dev_done = jax.device_get((tok, logprob, state.done))
        self._consume(reqs, tok[:, None], logprob[:, None], dev_done, on_finish)

        while not all(r.finished for r in reqs):
            host_done = np.zeros((b,), np.bool_)
            host_done[:n] = [r.finished for r in reqs]
            state = dataclasses.replace(state, done=state.done | jnp.asarray(host_done))
            cache, state, toks, logprobs = self.runner.decode(cache, state, self.decode_steps)
            toks, logprobs, dev_done = jax.device_get((toks, logprobs, state.done))
            self._consume(reqs, toks, logprobs, dev_done, on_finish)

    def _consume(self, reqs, toks, logprobs, dev_done, on_finish) -> None:
        """Apply one device call's tokens [B, steps] (-1: none) to the requests' outputs."""
        for i, r in enumerate(reqs):
            if r.finished:
                continue
            new = [(int(x), float(lp)) for x, lp in zip(toks[i], logprobs[i]) if x >= 0]
            for j, (tid, lp) in enumerate(new):
                last = dev_done[i] and j == len(new) - 1
                if self._append(r, tid, lp, last):
                    break
            if r.finished and on_finish is not None:
                on_finish(r)

    def _append(self, r: Request, tid: int, logprob: float, last: bool) -> bool:
        """Add one token to r's output; True once r is finished."""
        out, p = r.output, r.params
        out.token_ids.append(tid)
        out.cumulative_logprob += logprob
        ends_by_token = last and tid in r.stop_ids and len(out.token_ids) >= (p.min_tokens or 0)
        if r.detok is not None and (not ends_by_token or p.include_stop_str_in_output):
            new_text = r.detok.add(tid)
            out.text = r.detok.text
            hit = find_stop(out.text, len(new_text), p.stop_strings) if new_text else None
            if hit is not None:
                idx, stop = hit
                out.text = out.text[: idx + len(stop)] if p.include_stop_str_in_output else out.text[:idx]
                out.finish_reason, out.stop_reason = "stop", stop
                return True
        if last:
            if ends_by_token:
                out.finish_reason = "stop"
                out.stop_reason = tid if tid in (p.stop_token_ids or []) else None
            else:
                out.finish_reason = "length"
            return True
        return False
