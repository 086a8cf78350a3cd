"""jaxllm: LLM inference on JAX/XLA with the LLM API of TensorRT-LLM / vLLM."""

import os as _os

# XLA flags jaxllm wants, added to XLA_FLAGS at import unless the flag is already there (yours win)
# or JAXLLM_XLA_DEFAULTS=0; they take effect if jaxllm is imported before JAX starts its backend.
# Small all-reduces through NCCL with symmetric buffers instead of XLA's Triton one-shot kernel: a
# tensor-parallel decode step's all-reduce 23 -> 6 us, tp=2 batch 1 4.44 -> 4.26 ms on 2x H200
# (BENCHMARKS.md "Ninth session"). No effect on one device or on CPUs.
XLA_FLAG_DEFAULTS = (
    "--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE",
    "--xla_gpu_experimental_enable_nccl_symmetric_buffers=true",
)


def _add_xla_flag_defaults(environ=_os.environ):
    if environ.get("JAXLLM_XLA_DEFAULTS", "1") == "0":
        return
    flags = environ.get("XLA_FLAGS", "")
    missing = [f for f in XLA_FLAG_DEFAULTS if f.split("=", 1)[0] not in flags]
    if missing:
        environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


_add_xla_flag_defaults()

from .engine import EngineDeadError, RequestHandle
from .kv_cache_config import KvCacheConfig
from .llm import LLM
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineDeadError",
    "KvCacheConfig",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]
