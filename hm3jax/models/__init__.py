"""Llama-family decoder in Flax (NNX) with layer-path execution over a pool of layers.

The names below load on first use (PEP 562), so `hm3jax.models.params` and `hm3jax.models.config`
(all that the merge functions need) import without Flax.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config", "RopeScaling": "config",
    "forward": "decoder", "forward_path": "decoder", "init_params": "decoder",
    "KVCache": "generation", "generate": "generation", "generate_path": "generation",
    "SKIP": "pool", "LayerPool": "pool", "PoolError": "pool", "build_pool": "pool", "shell_of": "pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hm3jax.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hm3jax.models.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
