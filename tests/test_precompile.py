"""LLM.precompile: the step programs of every batch / width / prompt-length bucket up to max_len are
compiled before serving, so requests of those shapes never wait on a compilation, and nothing a
request can see changes (the warm-up calls write only into free blocks and drop the prefix cache)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams

KW = dict(load_format="dummy", dtype="float32", max_batch_size=8, max_seq_len=128, max_num_tokens=1024,
          compilation_cache=False)


def _prompts(n, seed=0, longest=60):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(5, 200, int(rng.integers(2, longest))).tolist()} for _ in range(n)]


def _programs(llm):
    r = llm._engine.runner
    return r._prefill._cache_size() + sum(f._cache_size() for f in r._decodes.values())


def test_no_compilation_while_serving_precompiled_shapes(tiny_checkpoints):
    path = str(tiny_checkpoints["llama3"])
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    with LLM(path, **KW) as plain:
        expected = [[o.outputs[0].token_ids for o in plain.generate(_prompts(n, n), sp, use_tqdm=False)]
                    for n, sp in ((7, greedy), (3, sampled), (1, greedy))]
    with LLM(path, **KW) as llm:
        report = llm.precompile(max_len=96)
        assert report["programs"] > 0
        before = _programs(llm)
        assert before >= report["programs"]  # every warm-up call is in jit's cache
        got = [[o.outputs[0].token_ids for o in llm.generate(_prompts(n, n), sp, use_tqdm=False)]
               for n, sp in ((7, greedy), (3, sampled), (1, greedy))]
        assert _programs(llm) == before  # batches of 7, 3 and 1 rows, greedy and sampled: nothing new compiled
    assert got == expected  # and the warm-up changed nothing the requests see


def test_min_len_leaves_out_shorter_shapes_only(tiny_checkpoints):
    """precompile(min_len=40): fewer programs, and prompts of 40+ tokens still compile nothing new
    (counted by JAX's compile events: jit's dispatch cache may add an entry for an executable it
    already has)."""
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, _secs, **_: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    path = str(tiny_checkpoints["llama3"])
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": rng.integers(5, 200, int(n)).tolist()}  # no shared prefixes
               for n in (40, 47, 60, 41, 52, 44, 58, 40)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(path, **KW) as llm:
        engine = llm._engine
        assert len(engine._warmup_calls(96, [True], 40)) < len(engine._warmup_calls(96, [True]))
        llm.precompile(max_len=96, sampled=False, min_len=40)
        assert compiles  # the listener sees compilations
        compiles.clear()
        for batch in (prompts[:5], prompts[5:7], prompts[7:]):
            llm.generate(batch, greedy, use_tqdm=False)
        assert compiles == []


def test_precompile_drops_the_prefix_cache_it_overwrites(tiny_checkpoints):
    """Blocks of a finished request stay reusable as a prefix; the warm-up writes into free blocks,
    so it must forget them -- a later request with the same prefix recomputes, with the same tokens."""
    path = str(tiny_checkpoints["llama3"])
    prompt = [{"prompt_token_ids": list(range(5, 5 + 70))}]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(path, **KW) as llm:
        first = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
        assert llm._engine.blocks.cached  # its full blocks are registered
        llm.precompile(max_len=80, sampled=False)
        assert not llm._engine.blocks.cached
        again = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert again == first


def test_precompile_arguments_are_checked(tiny_llm):
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, max_seq_len=\d+\], got 0"):
        tiny_llm.precompile(max_len=0)
    with pytest.raises(ValueError, match="max_len must be an int in"):
        tiny_llm.precompile(max_len=10**9)
    with pytest.raises(ValueError, match="greedy=True or sampled=True"):
        tiny_llm.precompile(greedy=False, sampled=False)
    with pytest.raises(ValueError, match=r"min_len must be an int in \[1, max_len=64\], got 65"):
        tiny_llm.precompile(max_len=64, min_len=65)
    engine = tiny_llm._engine  # one program per shape and per greedy / sampling variant asked for
    one, both = engine._warmup_calls(64, [True]), engine._warmup_calls(64, [True, False])
    assert len(both) == 2 * len(one) > 0
    assert {c[1]["all_greedy"] for c in one} == {True} and {c[1]["all_greedy"] for c in both} == {True, False}


def test_cached_prefixes_and_later_chunks_compile_nothing_new(tiny_checkpoints):
    """precompile() also covers prefill calls that do not start at position 0 -- prompts that
    continue a cached prefix (a shared system prompt) and the later chunks of prompts longer than the
    token budget: such calls get tables of one width (Engine.cached_prefill_width), so rows and chunk
    length are all their programs depend on. (On an H100 the uncovered ones stalled a server for
    seconds each.)"""
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, _secs, **_: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    path = str(tiny_checkpoints["llama3"])
    rng = np.random.default_rng(7)
    system = rng.integers(5, 200, 40).tolist()  # two and a half blocks, shared
    first = [{"prompt_token_ids": system + [7, 8, 9]}]
    more = [{"prompt_token_ids": system + rng.integers(5, 200, int(n)).tolist()} for n in (20, 9, 31)]
    long = [{"prompt_token_ids": rng.integers(5, 200, 90).tolist()}]  # three chunks of <= 32 tokens
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(KW, max_num_tokens=32)

    def run(llm):
        return [[o.outputs[0].token_ids for o in llm.generate(p, sp, use_tqdm=False)] for p in (first, more, long)]

    with LLM(path, **kw) as plain:
        expected = run(plain)
    with LLM(path, **kw) as llm:
        llm.precompile(max_len=128, sampled=False)
        compiles.clear()
        got = run(llm)
        assert llm._engine.scheduler.prefix_hit_tokens >= 3 * 32  # `more` continued the cached system prompt
        assert compiles == []
    assert got == expected


def test_cached_prefill_tables_are_wide_only_for_the_kernel(tiny_llm, monkeypatch):
    """Past-position-0 prefills get the wide fixed table only where the Pallas prefill kernel reads
    them (it visits a row's own pages only); the jnp reference, which gathers every page of the
    table, keeps the bucketed width."""
    from jaxllm.engine.engine import CACHED_PREFILL_MIN_TOKENS

    engine = tiny_llm._engine
    assert not engine.runner.prefill_reads_own_pages  # CPU: the reference
    assert [engine.cached_prefill_width(n) for n in (1, 3, 5)] == [1, 4, 8]
    monkeypatch.setattr(engine.runner, "_prefill_kernel", lambda *a: None)
    floor = min(engine.max_blocks_per_seq, -(-CACHED_PREFILL_MIN_TOKENS // engine.block_size))
    assert engine.runner.prefill_reads_own_pages and floor > 1
    assert [engine.cached_prefill_width(n) for n in (1, 3)] == [floor, floor]


def test_decode_min_rows_pads_batch_one_and_precompile_follows(tiny_checkpoints, monkeypatch):
    """JAXLLM_DECODE_MIN_ROWS=2 (an A/B switch: see Engine.min_decode_rows): a lone request decodes in
    a 2-row call, with the same tokens, and precompile covers exactly those shapes."""
    path = str(tiny_checkpoints["llama3"])
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    with LLM(path, **KW) as plain:
        expected = [o.outputs[0].token_ids for sp in (greedy, sampled) for o in plain.generate(_prompts(1), sp, use_tqdm=False)]
    monkeypatch.setenv("JAXLLM_DECODE_MIN_ROWS", "2")
    with LLM(path, **KW) as llm:
        llm.precompile(max_len=64)
        before = _programs(llm)
        runner, rows = llm._engine.runner, []
        real = runner.decode
        monkeypatch.setattr(runner, "decode", lambda tables, *a, **k: rows.append(tables.shape[0]) or real(tables, *a, **k))
        got = [o.outputs[0].token_ids for sp in (greedy, sampled) for o in llm.generate(_prompts(1), sp, use_tqdm=False)]
        assert _programs(llm) == before
        assert rows and set(rows) == {2}, rows
        assert llm._engine._decode_rows(3) == 4
    assert got == expected
