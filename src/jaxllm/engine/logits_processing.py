"""Requests with Python logits processors: the documented slower path.

A logits processor is any Python callable that sees the logits of every step before sampling:
``fn(output_token_ids, logits) -> logits`` or ``fn(prompt_token_ids, output_token_ids, logits) ->
logits`` (vLLM's two forms), logits a float32 numpy array [vocab]. Calling Python per token rules
out the engine's on-device decode loop, so such a request runs on a thread of its own: each step
computes the row's logits with the runner's scratch-pool forward pass over the whole sequence (no
KV reuse: cost grows with the square of the length), applies the processors, then samples with the
same on-device sampler and the same per-request key as the engine (so without processors it would
draw the same tokens), and feeds the token through the request's usual bookkeeping (stop tokens,
min/max tokens, stop strings, detokenization, logprobs, streaming).
"""

from __future__ import annotations

import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ..sampling import SamplingArrays, sample, token_info


def processors_of(params) -> list:
    procs = params.logits_processor
    return [] if procs is None else (list(procs) if isinstance(procs, (list, tuple)) else [procs])


def _arity(fn) -> int:
    try:
        return len([p for p in inspect.signature(fn).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        return 2


def run_request(runner, req, cancelled: threading.Event) -> None:
    """Generate req to its end (or cancellation) and publish through req.handle."""
    sp = req.params
    procs = [(fn, _arity(fn)) for fn in processors_of(sp)]
    arrays = SamplingArrays.from_requests([sp], [req.key_data], 1)
    num_lp = None if sp.logprobs is None else max(sp.logprobs, 1)
    try:
        while not req.finished:
            if cancelled.is_set():
                req.finish("cancelled")
                break
            ids = req.all_ids
            row = runner.last_logits([ids])[0]
            generated = ids[len(req.prompt_token_ids):]
            if len(generated) < (sp.min_tokens or 0):
                row[req.stop_ids] = -np.inf
            for fn, arity in procs:
                out = fn(list(req.prompt_token_ids), list(generated), row) if arity >= 3 else fn(list(generated), row)
                row = np.asarray(out, np.float32)
            tok, lps = sample(jnp.asarray(row)[None], arrays, jnp.asarray([len(ids)], jnp.int32), sp.is_greedy)
            info = jax.device_get(token_info(lps, tok, num_lp))
            tid = int(tok[0])
            last = tid in req.stop_ids and len(generated) + 1 >= (sp.min_tokens or 0)
            last = last or len(generated) + 1 >= sp.max_tokens
            req.receive(tid, {k: v[0] for k, v in info.items()}, last)
            if not req.apply_pending() and req.streaming:
                req.handle._publish(req.snapshot())
        req.handle._publish(req.snapshot())
    except BaseException as e:  # noqa: BLE001 - the caller must hear of it
        req.handle._publish(error=e)
