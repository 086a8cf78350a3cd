"""Model families (Flax NNX), their configs, declarative weight maps and the registry."""

from .config import ModelConfig
from .registry import Architecture, get_architecture, supported_architectures

__all__ = ["Architecture", "ModelConfig", "get_architecture", "supported_architectures"]
