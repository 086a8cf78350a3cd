"""jaxllm: LLM inference on JAX/XLA with the LLM API of TensorRT-LLM / vLLM."""

from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
