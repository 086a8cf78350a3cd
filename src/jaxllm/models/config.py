"""ModelConfig: the few numbers a decoder needs, read once from a transformers config.

Reading transformers' own config classes (rather than raw JSON) gets their defaults and their
GGUF-metadata conversion for free; this file only picks fields and normalises the rope settings,
which moved between transformers versions (``rope_scaling`` + ``rope_theta`` -> ``rope_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None = None
    hidden_act: str = "silu"
    dtype: str | None = None  # the checkpoint's dtype, if the config names one
    eos_token_ids: tuple[int, ...] = ()
    # weight-only quantization of the linear projections: None, "fp8" or "int8" (models/quant.py);
    # set by the loader (LLM(quantization=...) or a pre-quantized checkpoint), never read from HF
    quantization: str | None = None
    # fp8 weights only: calls of at least quant.FP8_MATMUL_MIN_TOKENS tokens multiply FP8 x FP8 with
    # the activations quantized per token (LLM(quantization="fp8-w8a8"))
    fp8_activations: bool = False
    # fp8 weights only: weight-only calls of at most fp8_gemv.MAX_ROWS tokens run jaxllm's Pallas
    # fp8 GEMV kernel, which reads the fp8 bytes (one NVIDIA GPU; set by the loader)
    fp8_gemv: bool = False
    # decode-sized weight-only matmuls (plain, int8, fp8) through pallas.gemv: "all", "small" (weights
    # of at most pallas.gemv.SMALL_WEIGHT elements), "quantized" (fp8 times one row) or "" (none);
    # set by the loader from JAXLLM_GEMV (pallas.gemv.gemv_wanted)
    triton_gemv: str = ""
    # q, k and v as one projection (attn.qkv, [embed, kv_heads, G + 2, head_dim]): set by the loader
    # (by default on several GPUs; JAXLLM_FUSED_QKV) when the KV heads split evenly over the devices
    # (loader.fused_qkv_wanted, models/llama.py: fuse_qkv)
    fused_qkv: bool = False
    # the residual add and the RMSNorm after it in one kernel at decode-sized calls (pallas.add_norm):
    # set by the loader (JAXLLM_FUSED_NORM, default auto: on NVIDIA GPUs)
    fused_norm: bool = False
    # fp8-w8a8 calls of >= 64 tokens: the gate/up product's scaling, silu(gate) * up and the per-token
    # FP8 quantization for down in one kernel (pallas.silu_mul_quant): set by the loader
    # (JAXLLM_FUSED_SILU_QUANT, default auto: on NVIDIA GPUs)
    fused_silu_quant: bool = False
    # fp8-w8a8 calls of >= 64 tokens on one device: the residual add, the RMSNorm and the per-token
    # FP8 quantization of the projection's input in one kernel (pallas.add_norm.add_rmsnorm_quant):
    # set by the loader (JAXLLM_FUSED_NORM_QUANT, opt-in until measured on a GPU)
    fused_norm_quant: bool = False
    # fp8 weights, untied LM head, one device: the LM head in fp8 too (per vocabulary row), as the
    # projections are -- half its bytes at batch 1, FP8 x FP8 at large batches with fp8-w8a8; set by
    # the loader (JAXLLM_FP8_LM_HEAD=1, opt-in: it moves the logits more than the projections do)
    quantize_lm_head: bool = False

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        arch = architecture_name(hf)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        act = getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")
        sliding = None
        if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
            sliding = int(hf.sliding_window)
        qwen2 = arch.startswith("Qwen2")
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
        if dtype is not None and not isinstance(dtype, str):
            dtype = str(dtype).removeprefix("torch.")
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
            rope=_rope_from_hf(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=qwen2 or bool(getattr(hf, "attention_bias", False)),
            o_bias=(not qwen2) and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=sliding,
            hidden_act="silu",
            dtype=dtype,
            eos_token_ids=eos_ids,
        )


def architecture_name(hf) -> str:
    """The HF architecture a transformers config names (GGUF configs name none: derive it)."""
    archs = getattr(hf, "architectures", None) or []
    return archs[0] if archs else type(hf).__name__.replace("Config", "ForCausalLM")


def _rope_from_hf(hf) -> RopeConfig:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
