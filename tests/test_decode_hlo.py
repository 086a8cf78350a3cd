"""The decode and prefill programs update the KV pool in place: every pool buffer is donated and
aliased to an output, and the compiled program copies none of them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
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
        lowered = runner._decode_for(1).lower(runner.params, runner.pool, tables, state, steps=4, num_logprobs=None,
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


def test_layers_share_one_trace_and_all_compile(tmp_path, monkeypatch):
    """The layers of a step program go through one jitted layer function: traced twice per program
    (the first layer, and the rest), not once per layer, while the compiled program still holds every layer (XLA inlines the calls):
    as many dots as with each layer traced on its own."""
    from jaxllm.models import llama

    from conftest import write_kernel_sized_config

    from jaxllm import LLM

    llm = LLM(str(write_kernel_sized_config(tmp_path / "m", num_hidden_layers=3)), load_format="dummy",
              max_seq_len=256, max_batch_size=8, compilation_cache=False)
    runner = llm._engine.runner
    reqs = [llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))]
    state = llm._engine._row_state(reqs, 2)
    tables = jnp.zeros((2, 3), jnp.int32)
    traced = []
    real = llama.DecoderLayer.__call__
    monkeypatch.setattr(llama.DecoderLayer, "__call__", lambda self, *a: traced.append(1) or real(self, *a))

    def compiled_dots():
        jax.clear_caches()
        traced.clear()
        hlo = runner._decode_for(1).lower(runner.params, runner.pool, tables, state, steps=3, num_logprobs=None,
                                          all_greedy=True).compile().as_text()
        return len(re.findall(r" dot\(", hlo)), len(traced)

    shared_dots, shared_traces = compiled_dots()
    monkeypatch.setattr(llama, "_call_layer", lambda layer, i, x, positions, cache, attend: layer(i, x, positions, cache, attend))
    own_dots, own_traces = compiled_dots()
    layers = runner.cfg.num_layers
    # the first layer has nothing to add before its input norm (the others add the previous MLP's output)
    assert layers == 3 and shared_traces == 2 and own_traces == layers
    llm.shutdown()
    assert shared_dots == own_dots >= 6 * layers  # q/k/v, o, gate/up, down, and attention's two


def test_padding_rows_write_the_padding_page_only():
    """A single-row write with the padding page matches the scatter it replaces, and its padding
    lands in the pool's last slot and nowhere else; several rows drop their padding."""
    from jaxllm.runner.paged import write_slots

    pool = jnp.arange(6 * 2 * 3, dtype=jnp.float32).reshape(6, 2, 3)  # 5 real slots + the padding slot
    rows = -jnp.ones((2, 1, 2, 3), jnp.float32)
    out = write_slots(pool, jnp.array([[2], [-1]]), rows, padding_page=True)
    assert (out == pool.at[2].set(-1)).all()
    one = write_slots(pool, jnp.array([[4]]), rows[:1], padding_page=True)
    assert (one == pool.at[4].set(-1)).all()
    pad_one = write_slots(pool, jnp.array([[-1]]), rows[:1], padding_page=True)
    assert (pad_one[:5] == pool[:5]).all() and (pad_one[5] == -1).all()
    dropped = write_slots(pool, jnp.array([[2], [-1]]), rows, padding_page=False)
    assert (dropped == pool.at[2].set(-1)).all()


def test_several_row_kv_writes_are_a_unique_index_scatter():
    """Several rows (padding among them) store with one scatter that declares its indices unique --
    each padding row its own index past the pool -- so XLA writes the rows as they are instead of
    compare-and-swap loops on the 8/16-bit elements; the values are those of the plain scatter."""
    from jaxllm.runner.paged import write_slots

    pool = jnp.zeros((64, 2, 8), jnp.float8_e4m3fn)
    slots = jnp.array([[3, 17, -1, 40], [-1, -1, 63, 0]])
    rows = jnp.arange(8 * 2 * 8, dtype=jnp.float32).reshape(2, 4, 2, 8).astype(jnp.float8_e4m3fn)
    fn = jax.jit(lambda p, s, r: write_slots(p, s, r, padding_page=False))
    hlo = fn.lower(pool, slots, rows).as_text()
    assert "unique_indices=true" in hlo.replace(" ", "").lower()
    out = np.asarray(fn(pool, slots, rows), np.float32)
    flat, r = np.asarray(slots).reshape(-1), np.asarray(rows, np.float32).reshape(-1, 2, 8)
    want = np.zeros((64, 2, 8), np.float32)
    want[flat[flat >= 0]] = r[flat >= 0]
    assert np.array_equal(out, want)


def test_batch1_decode_writes_kv_by_dynamic_update_slice(tiny_llm):
    """At batch 1 the decode step stores its K/V row with a dynamic-update-slice into the pool (no
    scatter, no read-back of the old row for an out-of-bounds select): on the GPU XLA then fuses the
    row's computation (RoPE) into the in-place update, two kernels fewer per layer."""
    engine = tiny_llm._engine
    runner = engine.runner
    reqs = [tiny_llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))]
    state = engine._row_state(reqs, 1)
    tables = jnp.zeros((1, 4), jnp.int32)
    text = runner._decode_for(1).lower(runner.params, runner.pool, tables, state, steps=2, num_logprobs=None,
                                       all_greedy=True).as_text()
    k = jax.tree.leaves(runner.pool)[0]
    pool_type = "tensor<{}x{}>".format("x".join(map(str, k.shape)), str(k.dtype).replace("float", "f"))
    updates = [ln for ln in text.splitlines() if "dynamic_update_slice" in ln and pool_type in ln]
    scatters = [ln for ln in text.splitlines() if "stablehlo.scatter" in ln and pool_type in ln]
    assert len(updates) >= 2 and not scatters, (len(updates), scatters[:1])  # K and V (the layers share one trace)
