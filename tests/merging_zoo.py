"""Tiny random HF Llama checkpoints for the merging tests: a base, three fine-tunes and misfits.

Built once per test process (cached) under a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import numpy as np

LAYERS = 4


def _config(**over):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def _save(model, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True)
    # Stand-in tokenizer files: the merge copies them, it never parses them.
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}, f)


@functools.cache
def build_zoo() -> dict[str, str]:
    """{"base", "ft1", "ft2", "ft3", "wide" (hidden 32: shape mismatch), "bigvocab"} -> directory."""
    import torch
    from transformers import LlamaForCausalLM

    root = tempfile.mkdtemp(prefix="hm3jax-merge-zoo-")
    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config()).float()
    paths = {"base": os.path.join(root, "base")}
    _save(base, paths["base"])
    rng = np.random.default_rng(1)
    for i in (1, 2, 3):
        ft = LlamaForCausalLM(_config()).float()
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        for k, v in sd.items():
            noise = rng.normal(scale=0.02, size=tuple(v.shape)).astype(np.float32)
            # Some entries untouched, a few large: exercises ties at zero and outliers.
            noise *= rng.random(size=noise.shape) < 0.8
            noise[rng.random(size=noise.shape) < 0.01] *= 10
            sd[k] = v + torch.from_numpy(noise)
        ft.load_state_dict(sd)
        paths[f"ft{i}"] = os.path.join(root, f"ft{i}")
        _save(ft, paths[f"ft{i}"])
    paths["wide"] = os.path.join(root, "wide")
    _save(LlamaForCausalLM(_config(hidden_size=32, intermediate_size=64)).float(), paths["wide"])
    paths["bigvocab"] = os.path.join(root, "bigvocab")
    _save(LlamaForCausalLM(_config(vocab_size=160)).float(), paths["bigvocab"])
    return paths


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every tensor of an HF safetensors directory, as float32 numpy (copies)."""
    from hm3jax.io.safetensors_io import CheckpointReader

    r = CheckpointReader(path)
    return {n: np.array(r.get(n), dtype=np.float32) for n in r.names}


def run_mergekit(recipe: dict, out: str) -> None:
    """mergekit in-process (same code path as `mergekit-yaml`, without a fresh interpreter per run)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), out,
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))


def load_params(path: str) -> dict:
    """An HF directory as a params pytree (models/params.py layout: layers stacked on axis 0)."""
    from hm3jax.models.params import parse_hf_name, set_path

    flat = read_all(path)
    per_layer: dict = {}
    tree: dict = {}
    for name, arr in flat.items():
        p, layer = parse_hf_name(name)
        if layer is None:
            set_path(tree, p, arr)
        else:
            per_layer.setdefault(p, {})[layer] = arr
    for p, layers in per_layer.items():
        set_path(tree, p, np.stack([layers[i] for i in sorted(layers)]))
    return tree
