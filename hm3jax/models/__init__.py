"""Llama-family decoder in Flax (NNX) with layer-path execution over a pool of layers."""

from hm3jax.models.config import ConfigError, ModelConfig, RopeScaling
