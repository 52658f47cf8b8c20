"""Hugging Face checkpoint directories <-> (ModelConfig, params pytree).

Reading goes tensor by tensor through memory-mapped safetensors (or, only when asked, pickle files);
writing goes through ShardedWriter inside an atomic output directory, so a failed save leaves nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from hm3jax.io.assemble import EMBED, check_params, float_dtype, hf_order, params_from_source
from hm3jax.io.atomic import atomic_output_dir, check_output_path
from hm3jax.io.errors import CheckpointError, CheckpointNotFoundError, PickleCheckpointError
from hm3jax.io.gguf import load_gguf, load_gguf_tokenizer
from hm3jax.io.paths import (
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILES,
    check_tokenizer_files,
    model_file,
)
from hm3jax.io.safetensors_io import CONFIG_FILE, CheckpointReader, parse_size, read_json_object
from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.models.config import ConfigError, ModelConfig
from hm3jax.models.params import get_path, hf_names

_PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Trainer side files that are pickles but not model weights.
_NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def has_safetensors(root: str) -> bool:
    """Whether directory `root` holds safetensors weights (a file or a sharded index)."""
    return any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(root))


def _pickle_files(root: str) -> list[str]:
    index = os.path.join(root, _PICKLE_INDEX)
    if os.path.isfile(index):
        weight_map = read_json_object(index, "a weights index (a JSON object with a 'weight_map')").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> weights file")
        return list(dict.fromkeys(model_file(root, s, f"{index}: weight_map[{k!r:.100}]")
                                  for k, s in weight_map.items()))
    return sorted(model_file(root, f, root) for f in os.listdir(root)
                  if f.endswith(_PICKLE_SUFFIXES) and not f.startswith(_NOT_WEIGHTS))


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF config.json; every problem is a ConfigError naming the file."""
    try:
        d = read_json_object(path, "an HF config.json (a JSON object)")
    except CheckpointNotFoundError:
        raise ConfigError(f"{path}: no such file (expected an HF config.json)") from None
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        return ModelConfig.from_hf_dict(d, source=path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: a field has a value of the wrong type ({e}); expected an HF "
                          "config.json of a supported model") from None


class _TorchSource:
    """Tensors of pickle checkpoints, loaded with torch's restricted (weights-only) unpickler."""

    def __init__(self, files: list[str], root: str):
        try:
            # heavy (torch, transformers): loaded only for the files that need it
            import torch
        except ModuleNotFoundError:
            raise CheckpointError(
                f"{root}: reading pickle weights ({', '.join(map(os.path.basename, files))}) with "
                "allow_pickle=True needs PyTorch, which is not installed; install torch or convert the "
                "checkpoint to safetensors") from None

        self._sd: dict[str, Any] = {}
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointNotFoundError(f"{f}: weights file listed by {_PICKLE_INDEX} does not exist", f)
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{f}: refused by torch.load(weights_only=True): {e}") from None
            if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{f}: expected a state dict (tensor name -> tensor)")
            self._sd.update(sd)
        self.names = list(self._sd)
        self._torch = torch

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> np.ndarray:
        t = self._sd[name].detach()
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def load_pretrained(path: str | os.PathLike, dtype: Any = None,
                    allow_pickle: bool = False) -> tuple[ModelConfig, dict]:
    """Load a checkpoint as (ModelConfig, params pytree of jax arrays; layout of models/params.py).

    Args:
      path: an HF directory (config.json + model.safetensors, or shards + model.safetensors.index.json)
        or a `.gguf` file (llama architecture; dequantised to float32).
      dtype: cast every tensor to this float dtype ("bfloat16", jnp.float32, ...); None keeps the
        stored dtype. The returned config's `torch_dtype` records the dtype of the params.
      allow_pickle: let a directory holding only `*.bin`/`*.pt` pickles be read with
        `torch.load(weights_only=True)`. Off by default because unpickling can run code.

    Raises CheckpointError (or its FileNotFoundError subclass) naming the file, tensors or shapes
    at fault; ConfigError for an unusable config.json.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path}: no such file or directory (expected an HF checkpoint directory or a .gguf file)", path)
    if _is_gguf(path):
        return load_gguf(path, dtype=dtype)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint (expected an HF directory or a .gguf file)")

    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        ggufs = [f for f in os.listdir(path) if f.lower().endswith(".gguf")]
        hint = f"; for GGUF pass the file itself, e.g. {os.path.join(path, ggufs[0])}" if ggufs else ""
        raise CheckpointNotFoundError(f"{path}: no {CONFIG_FILE} (not an HF checkpoint directory){hint}", cfg_path)
    cfg = read_config(cfg_path)

    if has_safetensors(path):
        with CheckpointReader(path) as reader:
            params = params_from_source(cfg, reader, dtype=dtype, where=path)
    else:
        pickles = _pickle_files(path)
        if not pickles:
            raise CheckpointNotFoundError(
                f"{path}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
                f"*.safetensors, and pickle files {_PICKLE_INDEX}, *.bin, *.pt)", path)
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{path}: weights are stored only as pickle files ({', '.join(map(os.path.basename, pickles))}). "
                "Unpickling can execute arbitrary code, so they are not read by default. Convert the "
                "checkpoint to safetensors, or pass allow_pickle=True to read it with "
                "torch.load(weights_only=True) if you trust its source.")
        params = params_from_source(cfg, _TorchSource(pickles, path), dtype=dtype, where=path)
    return cfg.replace(torch_dtype=np.dtype(params["embed_tokens"]["weight"].dtype).name), params


# ------------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer of an HF checkpoint directory or of a `.gguf` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory (expected an HF directory or .gguf)", path)
    if _is_gguf(path):
        return load_gguf_tokenizer(path)
    if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}) "
                              "and not a .gguf file")
    check_tokenizer_files(path)  # transformers would block in open() on a FIFO
    # heavy (torch, transformers): loaded only for the files that need it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _tokenizer_saver(tokenizer_from: Any) -> Callable[[str], None] | None:
    """Validate `tokenizer_from` now (before any output exists); return what writes it later."""
    if tokenizer_from is None:
        return None
    if hasattr(tokenizer_from, "save_pretrained"):
        return tokenizer_from.save_pretrained
    if not isinstance(tokenizer_from, (str, os.PathLike)):
        raise TypeError(f"tokenizer_from must be an HF directory, a .gguf file or a tokenizer object with "
                        f"save_pretrained; got {type(tokenizer_from).__name__}")
    src = os.fspath(tokenizer_from)
    if not os.path.exists(src):
        raise CheckpointNotFoundError(f"tokenizer_from {src}: no such file or directory", src)
    if _is_gguf(src):
        return load_gguf_tokenizer(src).save_pretrained
    files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))] if os.path.isdir(src) else []
    if not files:
        raise CheckpointError(f"tokenizer_from {src}: no tokenizer files (looked for "
                              f"{', '.join(TOKENIZER_FILES)}) and not a .gguf file")
    paths = [model_file(src, f, f"tokenizer_from {src}") for f in files]  # no link out of the directory

    def copy(dst: str) -> None:
        for path, f in zip(paths, files):
            shutil.copy2(path, os.path.join(dst, f))

    return copy


def _generation_config(cfg: ModelConfig, generation_config: Any, tokenizer_from: Any) -> dict | None:
    if generation_config is False:
        return None
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    if generation_config is None and isinstance(tokenizer_from, (str, os.PathLike)):
        src = os.path.join(os.fspath(tokenizer_from), GENERATION_CONFIG_FILE)
        if os.path.isfile(src):
            return read_json_object(model_file(os.fspath(tokenizer_from), GENERATION_CONFIG_FILE,
                                               f"tokenizer_from {os.fspath(tokenizer_from)}"),
                                    "a generation_config.json (a JSON object)")
    if generation_config not in (None, True):
        raise TypeError(f"generation_config must be a dict, True, False or None; got {generation_config!r}")
    ids = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
           "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(out_dir: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer_from: Any = None,
                    max_shard_size: int | str = "5GB", overwrite: bool = False, dtype: Any = None,
                    generation_config: Mapping | bool | None = None) -> str:
    """Write `params` as an HF checkpoint directory that transformers' `from_pretrained` loads.

    Args:
      out_dir: the directory to create; it appears only once complete (see atomic_output_dir).
      cfg, params: the architecture and a params pytree matching `param_shapes(cfg)` exactly.
      tokenizer_from: None; an HF directory (its tokenizer files are copied); a `.gguf` file (its
        tokenizer is rebuilt by transformers and saved); or a tokenizer object (its save_pretrained).
      max_shard_size: bytes per safetensors shard, int or "5GB"/"500MiB"; over it, several shards
        plus model.safetensors.index.json are written.
      overwrite: replace an existing `out_dir` (only after the new one is complete). `out_dir` may
        never be, contain or lie inside `tokenizer_from` (UnsafeOutputError).
      dtype: float dtype to store tensors in; None keeps each leaf's dtype. Recorded in config.json.
      generation_config: a dict to write as generation_config.json; False for none; None copies the
        one next to an HF-directory `tokenizer_from`, else writes the token ids of `cfg` (as True does).

    Returns the absolute path of the written directory.
    """
    inputs = [tokenizer_from] if isinstance(tokenizer_from, (str, os.PathLike)) else []
    check_output_path(out_dir, inputs)
    check_params(cfg, params)
    out_dt = None if dtype is None else float_dtype(dtype)
    limit = parse_size(max_shard_size)
    names = hf_names(cfg)

    def leaf_dtype(path) -> np.dtype:
        return out_dt or np.dtype(get_path(params, path).dtype)

    specs = {}
    for name in hf_order(cfg):
        path, _ = names[name]
        specs[name] = (tuple(get_path(params, path).shape[1 if path[0] == "layers" else 0:]), leaf_dtype(path))
    hf_cfg = cfg.replace(torch_dtype=specs[EMBED][1].name).to_hf_dict()
    gen = _generation_config(cfg, generation_config, tokenizer_from)
    save_tokenizer = _tokenizer_saver(tokenizer_from)

    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        if save_tokenizer is not None:
            save_tokenizer(tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_cfg, f, indent=2)
            f.write("\n")
        if gen is not None:
            with open(os.path.join(tmp, GENERATION_CONFIG_FILE), "w") as f:
                json.dump(gen, f, indent=2)
                f.write("\n")
        with ShardedWriter(tmp, specs, max_shard_size=limit) as writer:
            for name, (path, layer) in names.items():
                leaf = get_path(params, path)
                arr = np.asarray(leaf if layer is None else leaf[layer])
                writer.write(name, arr if arr.dtype == specs[name][1] else arr.astype(specs[name][1]))
    return os.path.abspath(os.fspath(out_dir))
