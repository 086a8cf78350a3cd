"""jaxllm: LLM inference on JAX/XLA with the LLM API of TensorRT-LLM / vLLM."""

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
