"""pallas.greedy (an all-greedy decode step's sampling and row bookkeeping in two kernels, opt-in
JAXLLM_GREEDY_KERNEL=1) against its jnp reference -- ModelRunner._advance's arithmetic -- in
interpret mode, and a tiny model's outputs unchanged with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.pallas.greedy import greedy_advance, greedy_fits, reference_greedy_advance


def _case(b: int, v: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, v)).astype(np.float32)
    x[0, 5] = x[0, v - 3] = 40.0  # a tie across blocks: the first index wins
    if b > 1:
        x[1, 9] = 60.0  # row 1's max is one of its stop tokens, forbidden before its min_tokens
    stop = np.full((b, 3), v, np.int32)
    stop[0, :2] = [v - 3, 11]
    if b > 1:
        stop[1, :2] = [9, 12]
    if b > 2:
        stop[2, 0] = int(np.argmax(x[2]))  # row 2 picks its stop token: done
    return [jnp.asarray(x), jnp.asarray(stop), jnp.arange(b, dtype=jnp.int32) + 100,
            jnp.arange(b, dtype=jnp.int32) + 30, jnp.asarray(rng.integers(0, 4, b), jnp.int32),
            jnp.asarray([0, 5] + [0] * (b - 2) if b > 1 else [0], jnp.int32),
            jnp.asarray(rng.integers(2, 6, b), jnp.int32), jnp.asarray(np.arange(b) == 3)]


@pytest.mark.parametrize("b,v,block_v", [(1, 1024, 64), (4, 1024, 256), (5, 4096, 4096), (2, 49152, 4096),
                                         (3, 128256, 4096)])
def test_greedy_advance_matches_the_runners_arithmetic(b, v, block_v):
    """Tokens (the first maximum, a stop token forbidden before min_tokens), the row state (done by
    a stop token or max_tokens, done rows untouched, -1 out) exactly; the logprob to float32
    rounding (its sum of exponentials runs block by block)."""
    args = _case(b, v, seed=b + v)
    want = reference_greedy_advance(*args)
    got = greedy_advance(*args, block_v=block_v, interpret=True)
    names = ("out", "logprob", "tokens", "positions", "num_generated", "done")
    for name, w, g in zip(names, want, got, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name == "logprob":
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(np.asarray(g), np.asarray(w)), (name, g, w)
    _check_in_place(args, block_v, interpret=True)
    out = np.asarray(got[0])
    assert out[0] == 5 and (b < 2 or out[1] != 9)
    if b > 3:
        assert out[3] == -1, "a done row makes no token"
    if b > 2:
        assert bool(got[5][2]), "a row that makes its stop token is done"


def _check_in_place(args, block_v=4096, interpret=False, steps=5, step=3):
    """The decode loop's form: the token and its logprob written into column `step` of [B, steps]
    buffers (the other columns kept), the state as the plain form returns it."""
    b = args[0].shape[0]
    out = jnp.asarray(np.arange(b * steps, dtype=np.int32).reshape(b, steps))
    out_lp = -jnp.asarray(np.arange(b * steps, dtype=np.float32).reshape(b, steps))
    want = reference_greedy_advance(*args, out, out_lp, jnp.int32(step))
    got = greedy_advance(*args, out, out_lp, jnp.int32(step), block_v=block_v, interpret=interpret)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        if i == 1:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(np.asarray(g), np.asarray(w)), (i, g, w)
    assert np.array_equal(np.delete(np.asarray(got[0]), step, axis=1), np.delete(np.asarray(out), step, axis=1))
    assert not np.array_equal(np.asarray(got[1])[:, step], np.asarray(out_lp)[:, step])


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 64])
def test_greedy_advance_compiled_on_the_gpu(b):
    """At Llama-3.1's vocabulary, compiled: the same tokens and state as the reference, logprobs to rounding."""
    args = _case(b, 128256, seed=7)
    want = reference_greedy_advance(*args)
    got = greedy_advance(*args)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if i == 1:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
        else:
            assert np.array_equal(np.asarray(g), np.asarray(w)), i
    _check_in_place(args)


def test_greedy_fits_and_refuses():
    assert greedy_fits(128256) and greedy_fits(49152) and not greedy_fits(32001) and not greedy_fits(1000)
    args = _case(1, 1000)
    with pytest.raises(ValueError, match="multiple of 64"):
        greedy_advance(*args, interpret=True)


def test_tiny_model_outputs_unchanged_with_the_greedy_kernel(tiny_checkpoints, monkeypatch):
    """JAXLLM_GREEDY_KERNEL=1: an all-greedy batch's tokens, finish reasons and logprobs (min_tokens,
    stop tokens, max_tokens) are those of the default path, and the kernel ran; a batch that samples
    keeps the default path."""
    import jaxllm.runner.runner as runner_mod

    prompts = ["The capital of France is", "Hello, my name is", "A"]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0, min_tokens=4, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0)]

    def run():
        with LLM(str(tiny_checkpoints["llama3"]), max_seq_len=128, compilation_cache=False, dtype="float32",
                 decode_steps=4) as llm:
            first = llm.generate(prompts, params, use_tqdm=False)
            stop = first[0].outputs[0].token_ids[6]  # a stop token that ends the first row mid-way
            more = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=3),
                    SamplingParams(max_tokens=5, temperature=0.8, seed=1)]  # samples: the default path
            second = llm.generate(prompts[:2], more, use_tqdm=False)
        return [(c.token_ids, c.finish_reason, c.cumulative_logprob) for r in first + second for c in r.outputs]

    monkeypatch.delenv("JAXLLM_GREEDY_KERNEL", raising=False)
    want = run()
    calls = []
    real = runner_mod.greedy_advance
    monkeypatch.setattr(runner_mod, "greedy_advance", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("JAXLLM_GREEDY_KERNEL", "1")
    got = run()
    assert calls, "the greedy kernel was not used"
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want):
        assert g[2] == pytest.approx(w[2], rel=1e-5, abs=1e-5)
    assert want[3][1] == "stop" or len(want[3][0]) < 12  # the stop token took effect
