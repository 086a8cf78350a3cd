"""The decode and prefill programs update the KV pool in place: every pool buffer is donated and
aliased to an output, and the compiled program copies none of them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from jaxllm import SamplingParams


def _aliases(hlo: str) -> dict[int, int]:
    """{parameter number: output index} from the module's input_output_alias attribute."""
    m = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", hlo, re.S)
    assert m, "the program aliases no input to an output"
    return {int(p): int(o) for o, p in re.findall(r"\{(\d+)\}: \((\d+), \{\}", m.group(1))}


@pytest.mark.parametrize("program", ["decode", "prefill"])
def test_pool_is_donated_and_never_copied(tiny_llm, program):
    engine = tiny_llm._engine
    runner = engine.runner
    reqs = [tiny_llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))]
    state = engine._row_state(reqs, 2)
    tables = jnp.zeros((2, 4), jnp.int32)
    if program == "decode":
        lowered = runner._decode.lower(runner.params, runner.pool, tables, state, steps=4, num_logprobs=None,
                                       all_greedy=True)
    else:
        toks = jnp.zeros((2, 16), jnp.int32)
        lowered = runner._prefill.lower(runner.params, runner.pool, toks, toks, toks > 0, tables,
                                        jnp.zeros((2,), jnp.int32), state, num_logprobs=None, all_greedy=True)
    hlo = lowered.compile().as_text()
    n_params = len(jax.tree.leaves(runner.params))
    pool_leaves = jax.tree.leaves(runner.pool)
    aliases = _aliases(hlo)
    for i in range(len(pool_leaves)):
        assert n_params + i in aliases, f"pool buffer {i} (parameter {n_params + i}) is not updated in place"
    k = pool_leaves[0]
    pool_type = "{}[{}]".format(str(k.dtype).replace("float", "f"), ",".join(map(str, k.shape)))
    assert pool_type in hlo  # the check below looks for the right type
    copies = [line for line in hlo.splitlines() if " copy(" in line and pool_type in line.split("=")[1][:80]]
    assert not copies, f"the program copies a pool buffer: {copies[:2]}"


def test_layers_share_one_trace_and_all_compile(tiny_llm, monkeypatch):
    """The layers of a step program go through one jitted layer function: traced once per program,
    not once per layer, while the compiled program still holds every layer (XLA inlines the calls):
    as many dots as with each layer traced on its own."""
    from jaxllm.models import llama

    runner = tiny_llm._engine.runner
    reqs = [tiny_llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))]
    state = tiny_llm._engine._row_state(reqs, 2)
    tables = jnp.zeros((2, 3), jnp.int32)
    traced = []
    real = llama.DecoderLayer.__call__
    monkeypatch.setattr(llama.DecoderLayer, "__call__", lambda self, *a: traced.append(1) or real(self, *a))

    def compiled_dots():
        jax.clear_caches()
        traced.clear()
        hlo = runner._decode.lower(runner.params, runner.pool, tables, state, steps=3, num_logprobs=None,
                                   all_greedy=True).compile().as_text()
        return len(re.findall(r" dot\(", hlo)), len(traced)

    shared_dots, shared_traces = compiled_dots()
    monkeypatch.setattr(llama, "_call_layer", lambda layer, i, x, positions, cache, attend: layer(i, x, positions, cache, attend))
    own_dots, own_traces = compiled_dots()
    layers = runner.cfg.num_layers
    assert layers > 1 and shared_traces == 1 and own_traces == layers
    assert shared_dots == own_dots >= 6 * layers  # q/k/v, o, gate/up, down, and attention's two
