"""Checkpoints in and out: HF directories (safetensors, sharded), GGUF import, atomic writing."""

from hm3jax.io.atomic import (
                              OutputExistsError,
                              UnsafeOutputError,
                              atomic_output_dir,
                              check_output_path,
                              clean_stale_temp_dirs,
)
from hm3jax.io.errors import CheckpointError, CheckpointNotFoundError, PickleCheckpointError
from hm3jax.io.gguf import load_gguf, smollm2_gguf
from hm3jax.io.hf import load_pretrained, load_tokenizer, save_pretrained
from hm3jax.io.safetensors_io import CheckpointReader, parse_size
from hm3jax.io.safetensors_writer import ShardedWriter

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "OutputExistsError",
    "PickleCheckpointError",
    "ShardedWriter",
    "UnsafeOutputError",
    "atomic_output_dir",
    "check_output_path",
    "clean_stale_temp_dirs",
    "load_gguf",
    "load_pretrained",
    "load_tokenizer",
    "parse_size",
    "save_pretrained",
    "smollm2_gguf",
]
