"""jaxllm's own checkpoints: converted parameters as an Orbax checkpoint, beside config and tokenizer.

``LLM.save(path)`` writes the parameters in the model's own layout (already transposed, reshaped and
cast), so loading skips the HF -> jaxllm conversion and restores each array straight onto its
shards of the mesh, for any tensor-parallel size. The folder also holds the transformers config and
the tokenizer, and ``jaxllm.json``, the marker that tells the loader what the folder is (with the
compute dtype and the weight quantization: a quantized model is saved as its 8-bit weights and
float32 scales, and restored as such).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ..sharding import named_sharding

MARKER = "jaxllm.json"
# 1: the first format; 2: fp8 projection weights are stored K-minor ([out..., in...], models/quant.py);
# 3: k/v and gate/up are fused parameters (attn.kv, mlp.gate_up; models/llama.py); 4: the fused k/v
# is [embed, kv_heads, 2, head_dim] (was [embed, 2, kv_heads, head_dim]). Formats 1-3 hold other
# arrays and are refused with the way out (save again from the HF checkpoint).
FORMAT_VERSION = 4
READABLE_VERSIONS = (4,)


def is_jaxllm_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / MARKER).exists()


def saved_dtype(folder: Path) -> str:
    return json.loads((folder / MARKER).read_text())["dtype"]


def saved_quantization(folder: Path) -> str | None:
    """The projections' weight quantization the checkpoint was saved with (None: unquantized)."""
    return json.loads((folder / MARKER).read_text()).get("quantization")


def saved_fp8_lm_head(folder: Path) -> bool:
    """Whether the checkpoint was saved with its LM head in fp8 (JAXLLM_FP8_LM_HEAD=1)."""
    return bool(json.loads((folder / MARKER).read_text()).get("fp8_lm_head", False))


def save_checkpoint(path: Path, params: dict, hf_config, tokenizer, dtype, quantization=None,
                    fp8_lm_head: bool = False) -> None:
    """Write `params` (a pure dict of arrays in the canonical layout: q and kv apart, see
    models/llama.py: unfused_qkv_dict), the HF config and the tokenizer into a new folder."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"path={str(path)!r} exists and is not empty; save into a new folder")
    path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", params)
    ckptr.wait_until_finished()
    hf_config.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    (path / MARKER).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "dtype": jnp.dtype(dtype).name, "quantization": quantization,
         "fp8_lm_head": fp8_lm_head}
    ))


def restore_params(folder: Path, abstract_state: nnx.State, mesh) -> nnx.State:
    """The saved parameters, each restored directly onto its sharding on mesh (cast to the target dtype)."""
    import orbax.checkpoint as ocp

    meta = json.loads((folder / MARKER).read_text())
    version = meta.get("format_version")
    if version in (1, 2, 3):
        raise ValueError(f"{folder} holds a jaxllm checkpoint of format {version}, saved before the fused k/v "
                         f"parameter took its layout of format {FORMAT_VERSION} ([embed, kv_heads, 2, head_dim]): "
                         "load the original HF checkpoint with LLM(...) and save it again with LLM.save")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{folder} holds a jaxllm checkpoint of format {version}; this jaxllm reads formats "
                         f"{list(READABLE_VERSIONS)}")
    flat = nnx.to_flat_state(abstract_state)
    for _, var in flat:
        target = var.get_value()
        sharding = named_sharding(var.get_metadata()["axes"], mesh, tuple(target.shape))
        var.set_value(jax.ShapeDtypeStruct(target.shape, target.dtype, sharding=sharding))
    state = nnx.from_flat_state(flat)
    restored = ocp.StandardCheckpointer().restore(Path(folder).resolve() / "params", nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return state
