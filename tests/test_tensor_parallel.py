"""Tensor parallelism on 8 virtual CPU devices: same greedy tokens and logits as one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import write_tiny_checkpoint

SCRIPT = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxllm import LLM, SamplingParams
import jaxllm.sharding as shd

traced = []  # the row-parallel projections the runner's TensorParallel traced in a shard_map
_rp = shd.TensorParallel.row_parallel
kept_f32 = []  # row-parallel sums handed on in float32 (to pallas.add_norm, which rounds them)
shd.TensorParallel.row_parallel = lambda self, f, x, xa, w, wa, s=None, **k: (self.mode != "xla" and traced.append(wa)) or (k.get("keep_float32") and kept_f32.append(1)) or _rp(self, f, x, xa, w, wa, s, **k)
import jaxllm.pallas.gemv as gemv_module
gemv_calls = []  # projections traced through pallas.gemv (JAXLLM_GEMV=1)
_gemv = gemv_module.gemv
gemv_module.gemv = lambda *a, **k: gemv_calls.append(1) or _gemv(*a, **k)
import jaxllm.pallas.add_norm as add_norm_module
add_norm_calls = []  # residual adds + RMSNorms traced through pallas.add_norm (JAXLLM_FUSED_NORM=1)
_add_norm = add_norm_module.add_rmsnorm
add_norm_module.add_rmsnorm = lambda *a, **k: add_norm_calls.append(1) or _add_norm(*a, **k)
_embed = shd.TensorParallel.embed
shd.TensorParallel.embed = lambda self, t, ta, tok: traced.append(("embed",) + tuple(ta)) or _embed(self, t, ta, tok)

out = {}
for tp, dp, source in json.loads(sys.argv[3]):
    path = sys.argv[1] if source == "hf" else sys.argv[2]  # the Orbax checkpoint saved at tp=1
    traced.clear()
    gemv_calls.clear()
    add_norm_calls.clear()
    kept_f32.clear()
    llm = LLM(path, tensor_parallel_size=tp, data_parallel_size=dp, max_seq_len=128, compilation_cache=False)
    if tp == 1:
        llm.save(sys.argv[2])
    outs = llm.generate(
        ["The capital of France is", "Hello, my name is", "In 1492, Columbus sailed the ocean blue and", "A"],
        SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False,
    )
    ids = llm.tokenizer.encode("In 1492, Columbus sailed across the Atlantic Ocean")
    logits = [np.asarray(e.runner.hidden_states(jnp.asarray([ids], jnp.int32))[1]).tolist() for e in llm._engines]
    replica_devices = [
        sorted(d.id for d in jax.tree.leaves(e.runner.params)[0].sharding.device_set) for e in llm._engines
    ]
    served = sorted({s["replica"] for s in llm.get_stats() if s["new_tokens"]})
    # the collectives of a decode program (2 rows): their kind and result shape
    e = llm._engine
    reqs = [llm._make_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4))]
    hlo = e.runner._decode_for(1).lower(e.runner.params, e.runner.pool, e._put(jnp.zeros((2, 4), jnp.int32)),
                                        e._row_state(reqs, 2), steps=4, num_logprobs=None, all_greedy=True).compile().as_text()
    collectives = re.findall(r"= \w+\[([\d,]*)\][^ ]* (all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
    params = {}
    for path, var in nnx.to_flat_state(llm._engine.runner.params):
        arr = var.get_value()
        params[".".join(map(str, path))] = dict(
            total=arr.nbytes, per_device=sorted({s.data.nbytes for s in arr.addressable_shards}),
            devices=len(arr.sharding.device_set), spec=str(arr.sharding.spec),
        )
    pool = llm._engine.runner.pool[0][0]
    out[f"{tp}x{dp}" + ("-orbax" if source == "orbax" else "")] = dict(
        tokens=[o.outputs[0].token_ids for o in outs], logits=logits, params=params,
        replica_devices=replica_devices, served=served, collectives=collectives, row_parallel=sorted(set(map(tuple, traced))), gemv_calls=len(gemv_calls), add_norm_calls=len(add_norm_calls), kept_f32=len(kept_f32),
        pool=dict(total=pool.nbytes, per_device=sorted({s.data.nbytes for s in pool.addressable_shards}),
                  heads=pool.shape[1]),
    )
    llm.shutdown()
print("RESULT " + json.dumps(out))
"""


# (tp, dp, checkpoint) runs of the script, in order (the Orbax checkpoint is tp=1's save): every
# layout of 4 query / 2 KV heads (split at tp=2, one copy a device at 4, replicated at 8), replicas,
# an Orbax restore at another tp
ALL_RUNS = ((1, 1, "hf"), (2, 1, "hf"), (4, 1, "hf"), (8, 1, "hf"), (2, 2, "hf"), (4, 1, "orbax"))


def _run(path, tmp_path, runs=ALL_RUNS, **extra_env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLM_FUSED_QKV": "1", **extra_env}  # the opt-in fused q/k/v where tp allows
    cmd = [sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "orbax"), json.dumps(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def _check(res, num_heads, num_kv_heads):
    base = res["1x1"]
    ref = np.asarray(base["logits"][0])
    for key in [k for k in res if k != "1x1"]:  # "4x1-orbax" restores tp=1's Orbax save at tp=4
        r = res[key]
        tp, dp = map(int, key.removesuffix("-orbax").split("x"))
        assert r["tokens"] == base["tokens"], f"tp={tp} dp={dp}: greedy tokens differ from tp=1"
        # the embedding lookup is the vocabulary-parallel one of sharding.TensorParallel (left to
        # XLA, a decode step all-gathered the whole table on two H100s)
        assert ["embed", "vocab", "embed"] in r["row_parallel"], (key, r["row_parallel"])
        for logits in r["logits"]:  # every replica
            err = np.linalg.norm(np.asarray(logits) - ref) / np.linalg.norm(ref)
            assert err <= 1e-5, f"tp={tp} dp={dp}: float32 logits differ by {err:.2e}"
        # replicas sit on disjoint devices, and each served requests
        devs = [d for replica in r["replica_devices"] for d in replica]
        assert len(devs) == len(set(devs)) == tp * dp, r["replica_devices"]
        assert r["served"] == list(range(dp)), r["served"]
        # each device holds only its shard: split tensors take 1/tp of their bytes per device
        # q/k/v are one parameter where the KV heads split evenly (split with them), else q apart
        fused = "layers.0.attn.qkv" in r["params"]
        assert fused == (num_kv_heads % tp == 0), (tp, fused)
        q = r["params"]["layers.0.attn.qkv" if fused else "layers.0.attn.q"]
        expect = q["total"] // tp if num_heads % tp == 0 else q["total"]
        assert q["per_device"] == [expect] and q["devices"] == tp, (tp, q)
        for name in ("layers.0.mlp.gate_up", "layers.0.mlp.down", "embed", "lm_head"):
            p = r["params"][name]
            assert p["per_device"] == [p["total"] // tp], (tp, name, p)
        # a decode program moves no weights or activations between devices beyond its all-reduces:
        # the only gathers are sampling's per-shard best candidates, [rows, tp] (the attention
        # projections run as 2-D matmuls over flattened head dims, models/llama.py: _flat_einsum)
        assert r["collectives"] and all(c == [f"2,{tp}", "all-gather"] for c in r["collectives"]), (tp, r["collectives"])
        norm = r["params"]["norm.weight"]
        assert norm["per_device"] == [norm["total"]], "norms are replicated"
        # KV pool: split over KV heads when they divide tp; with fewer KV heads than devices (and the
        # query heads split) one copy of each KV head per device (tp heads, split); else replicated
        pool = r["pool"]
        duplicated = num_kv_heads < tp and num_heads % tp == 0
        assert pool["heads"] == (tp if duplicated else num_kv_heads), (tp, pool)
        split = num_kv_heads % tp == 0 or duplicated
        assert pool["per_device"] == [pool["total"] // tp if split else pool["total"]], (tp, pool)


def test_tensor_parallel_kv_heads_do_not_divide(tiny_checkpoints, tmp_path):
    # 4 query / 2 KV heads: KV split at tp=2, one copy per device at tp=4 (4 pool heads), replicated at
    # tp=8 (query heads replicated there too)
    _check(_run(tiny_checkpoints["llama3"], tmp_path), num_heads=4, num_kv_heads=2)


def test_tensor_parallel_row_parallel_sums_in_shard_map(tiny_checkpoints, tmp_path):
    # the runner adds the row-parallel projections' partial sums itself (shard_map + psum: the path
    # the one-shot GPU all-reduce takes at tp=2) instead of XLA's partitioner: same tokens and logits
    res = _run(tiny_checkpoints["llama3"], tmp_path, runs=ALL_RUNS[:3] + ALL_RUNS[4:5], JAXLLM_ROW_PARALLEL="psum")
    _check(res, num_heads=4, num_kv_heads=2)
    assert res["1x1"]["row_parallel"] == []  # one device: nothing to add
    for key in ("2x1", "4x1", "2x2"):  # o and down (plain layout) and the lookup went through it
        assert res[key]["row_parallel"] == [["embed", "vocab", "embed"], ["heads", "head_dim", "embed"], ["mlp", "embed"]], (
            key, res[key]["row_parallel"])


def test_tensor_parallel_projections_per_shard_through_gemv(tiny_checkpoints, tmp_path):
    # every projection in shard_map (JAXLLM_ROW_PARALLEL=psum), the decode-sized ones through
    # pallas.gemv on each device's shard (JAXLLM_GEMV=1; interpret mode here) and the residual adds +
    # RMSNorms through pallas.add_norm on every device (JAXLLM_FUSED_NORM=1): tp=1's tokens and logits
    res = _run(tiny_checkpoints["llama3"], tmp_path, runs=ALL_RUNS[:3], JAXLLM_ROW_PARALLEL="psum", JAXLLM_GEMV="1",
               JAXLLM_FUSED_NORM="1")
    _check(res, num_heads=4, num_kv_heads=2)
    for key in ("1x1", "2x1", "4x1"):
        assert res[key]["gemv_calls"] >= 4, (key, res[key]["gemv_calls"])
        assert res[key]["add_norm_calls"] >= 4, (key, res[key]["add_norm_calls"])
        # under tensor parallelism o's and down's summed partials reach the kernel in float32 (no convert)
        assert (res[key]["kept_f32"] >= 2) == (key != "1x1"), (key, res[key]["kept_f32"])


def test_tensor_parallel_kv_heads_divide(tmp_path):
    path = write_tiny_checkpoint("llama_kv8", tmp_path / "kv8")
    _check(_run(path, tmp_path, runs=((1, 1, "hf"), (2, 1, "hf"), (8, 1, "hf"))), num_heads=8, num_kv_heads=8)


def test_parallel_sizes_are_checked_before_loading(tiny_checkpoints):
    import jax
    import pytest

    from jaxllm import LLM

    path = str(tiny_checkpoints["llama3"])
    with pytest.raises(ValueError, match="tensor_parallel_size \\* data_parallel_size must be <= the number of devices"):
        LLM(path, tensor_parallel_size=len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        LLM(path, data_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(path, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be 1"):
        LLM(path, pipeline_parallel_size=2)


def test_data_parallel_is_refused_across_processes(tiny_checkpoints, monkeypatch):
    """Replicas over several processes are not supported yet: every process refuses before loading."""
    import jax
    import pytest

    from jaxllm import LLM

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"data_parallel_size must be 1 with several processes .* got 2"):
        LLM(str(tiny_checkpoints["llama3"]), data_parallel_size=2)


READS = r"""
import json, os, re, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
from pathlib import Path
from flax import nnx
import jax.numpy as jnp
from transformers import AutoConfig
from jaxllm.loader.weights import LazyTensor, iter_safetensors, place_weights
from jaxllm.models import ModelConfig, get_architecture
from jaxllm.sharding import make_meshes

cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(sys.argv[1]))
arch = get_architecture(cfg.architecture)
mesh = make_meshes(4)[0]
reads = []

def recorded():
    for name, t in iter_safetensors(Path(sys.argv[1])):
        def read(index, t=t, name=name):
            reads.append([name, None if index is None else [[s.start, s.stop] for s in index]])
            return t.read(index)
        yield name, LazyTensor(t.shape, read)

abstract = nnx.state(nnx.eval_shape(lambda: arch.module(cfg, jnp.float32, rngs=nnx.Rngs(0))))
place_weights(abstract, recorded(), cfg, arch.weight_map, mesh)
print("RESULT " + json.dumps(reads))
"""


def test_each_device_reads_only_its_slice(tiny_checkpoints):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLLM_FUSED_QKV": "1"}  # the opt-in fused q/k/v where tp allows
    res = subprocess.run(
        [sys.executable, "-c", READS, str(tiny_checkpoints["llama3"])], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    reads = json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert all(index is not None for _, index in reads), "a tensor was read whole"
    # q_proj [4 heads * 32, 64] at tp=4: each device reads its own 32 rows, never the whole tensor
    q = sorted(tuple(map(tuple, index)) for name, index in reads if name == "model.layers.0.self_attn.q_proj.weight")
    assert q == [((i * 32, (i + 1) * 32), (0, 64)) for i in range(4)], q
    # down_proj [64, 128] (columns = the MLP dim, split over 4 devices)
    down = sorted(tuple(map(tuple, index)) for name, index in reads if name == "model.layers.0.mlp.down_proj.weight")
    assert down == [((0, 64), (i * 32, (i + 1) * 32)) for i in range(4)], down


EMBED_SCRIPT = r"""
import os, re, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxllm.sharding import TensorParallel, make_mesh

for tp in (2, 4, 8):
    mesh = make_mesh(jax.devices()[:tp])
    table = jax.device_put(jax.random.normal(jax.random.key(0), (64, 16), jnp.float32), NamedSharding(mesh, P("model", None)))
    tokens = jnp.asarray([[0, 63, 17], [31, 32, 8]], jnp.int32)
    for mode in ("xla", "psum"):
        f = jax.jit(lambda t, tok: TensorParallel(mesh, mode).embed(t, ("vocab", "embed"), tok))
        np.testing.assert_array_equal(np.asarray(f(table, tokens)), np.asarray(table)[np.asarray(tokens)])
        hlo = f.lower(table, tokens).compile().as_text()
        # one all-reduce of the looked-up rows, never a gather of the table
        assert not re.search(r"all-gather|all-to-all|collective-permute", hlo), hlo
        assert re.findall(r"= f32\[([\d,]*)\][^ ]* all-reduce(?:-start)?\(", hlo) == ["2,3,16"], hlo
print("OK")
"""


def test_vocab_parallel_embedding_is_one_all_reduce_of_the_rows():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", EMBED_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def test_row_parallel_modes_are_checked():
    import jax
    import pytest

    from jaxllm.sharding import make_mesh, tensor_parallel_for

    mesh = make_mesh(jax.devices()[:1])
    assert tensor_parallel_for(mesh, "psum") is None  # one device: nothing to do
    with pytest.raises(ValueError, match="JAXLLM_ROW_PARALLEL must be one of"):
        tensor_parallel_for(mesh, "nccl")


ONESHOT_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import jax
from jaxllm.sharding import make_mesh, tensor_parallel_for
for n, mode in ((2, "psum"), (2, "xla")):
    assert tensor_parallel_for(make_mesh(jax.devices()[:n]), mode).mode == mode
for n in (2, 4):  # the default
    assert tensor_parallel_for(make_mesh(jax.devices()[:n])).mode == "xla"
for n in (2, 4):
    try:
        tensor_parallel_for(make_mesh(jax.devices()[:n]), "oneshot")
    except ValueError as e:
        assert "needs tensor_parallel_size=2 on the GPUs of one process" in str(e), e
    else:
        raise AssertionError("oneshot accepted on CPU devices")
print("OK")
"""


def test_oneshot_all_reduce_is_refused_off_gpus():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", ONESHOT_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


BF16_PARTIALS_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import numpy as np, jax.numpy as jnp
from jaxllm import LLM
ids = jnp.asarray([[5, 9, 17, 33, 2, 71, 8, 100, 3, 4, 5, 6]], jnp.int32)
res = {}
for tp, mode in ((1, "xla"), (2, "psum")):
    os.environ["JAXLLM_ROW_PARALLEL"] = mode
    with LLM(sys.argv[1], tensor_parallel_size=tp, dtype="bfloat16", max_seq_len=64, max_batch_size=1,
             compilation_cache=False) as llm:
        res[tp] = np.asarray(llm._engine.runner.hidden_states(ids)[1], np.float32)
print("EQUAL", float(np.mean(res[2] == res[1])))
"""


def test_row_parallel_partial_sums_are_added_in_float32(tiny_checkpoints):
    """bfloat16 at tp=2 with the partial sums added in shard_map: each shard's partial product stays
    float32 through the all-reduce and is rounded once, as tp=1's dot rounds its whole sum once, so
    tp=2's logits are tp=1's (bfloat16 partials rounded before the add left ~all of them 1-2 ulp off,
    and tp=2's greedy tokens off tp=1's at clear margins on 2x H200)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", BF16_PARTIALS_SCRIPT, str(tiny_checkpoints["llama3"])],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    equal = float(res.stdout.strip().split("EQUAL")[-1])
    assert equal >= 0.99, equal


def test_xla_flag_defaults_are_added_unless_set_or_refused():
    """jaxllm adds its XLA flags (NCCL symmetric all-reduces) to XLA_FLAGS at import; a flag the user
    set keeps the user's value, and JAXLLM_XLA_DEFAULTS=0 adds none."""
    import jaxllm

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    jaxllm._add_xla_flag_defaults(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *jaxllm.XLA_FLAG_DEFAULTS]
    mine = "--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE"
    env = {"XLA_FLAGS": mine}
    jaxllm._add_xla_flag_defaults(env)
    assert env["XLA_FLAGS"].split() == [mine, jaxllm.XLA_FLAG_DEFAULTS[1]]
    env = {"JAXLLM_XLA_DEFAULTS": "0"}
    jaxllm._add_xla_flag_defaults(env)
    assert "XLA_FLAGS" not in env
