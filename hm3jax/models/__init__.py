"""Llama-family decoder in Flax (NNX) with layer-path execution over a pool of layers."""

from hm3jax.models.config import ConfigError, ModelConfig, RopeScaling
from hm3jax.models.decoder import forward, forward_path, init_params
from hm3jax.models.generate import KVCache, generate, generate_path
from hm3jax.models.pool import SKIP, LayerPool, PoolError, build_pool, shell_of

__all__ = [
    "SKIP",
    "ConfigError",
    "KVCache",
    "LayerPool",
    "ModelConfig",
    "PoolError",
    "RopeScaling",
    "build_pool",
    "forward",
    "forward_path",
    "generate",
    "generate_path",
    "init_params",
    "shell_of",
]
