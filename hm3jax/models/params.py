"""The parameter pytree: layout, HF tensor names, shapes.

Params are a plain nested dict of arrays whose keys follow Hugging Face's module names, with every
per-layer tensor stacked on a leading layer axis and kept in HF orientation (`[out, in]` for
projections), so a merge is a `tree_map` and checkpoint I/O is a rename:

    {
      "embed_tokens": {"weight": [V, D]},
      "layers": {
        "input_layernorm":          {"weight": [L, D]},
        "self_attn": {
          "q_proj": {"weight": [L, Hq*hd, D], "bias": [L, Hq*hd]},   # bias only with qkv_bias
          "k_proj": {"weight": [L, Hkv*hd, D], "bias": [L, Hkv*hd]},
          "v_proj": {"weight": [L, Hkv*hd, D], "bias": [L, Hkv*hd]},
          "o_proj": {"weight": [L, D, Hq*hd]},
        },
        "post_attention_layernorm": {"weight": [L, D]},
        "mlp": {"gate_proj": {"weight": [L, F, D]}, "up_proj": {...}, "down_proj": {"weight": [L, D, F]}},
      },
      "norm": {"weight": [D]},
      "lm_head": {"weight": [V, D]},    # absent when tie_word_embeddings
    }

HF name of a leaf: `model.layers.{i}.self_attn.q_proj.weight` for layer i of `layers/...`,
`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from hm3jax.models.config import ModelConfig

Path = tuple[str, ...]

SHELL_KEYS = ("embed_tokens", "norm", "lm_head")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shape of one layer's tensors (without the layer axis), keyed by path inside `layers`."""
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    s: dict[Path, tuple[int, ...]] = {
        ("input_layernorm", "weight"): (D,),
        ("self_attn", "q_proj", "weight"): (q, D),
        ("self_attn", "k_proj", "weight"): (kv, D),
        ("self_attn", "v_proj", "weight"): (kv, D),
        ("self_attn", "o_proj", "weight"): (D, q),
        ("post_attention_layernorm", "weight"): (D,),
        ("mlp", "gate_proj", "weight"): (F, D),
        ("mlp", "up_proj", "weight"): (F, D),
        ("mlp", "down_proj", "weight"): (D, F),
    }
    if cfg.qkv_bias:
        s[("self_attn", "q_proj", "bias")] = (q,)
        s[("self_attn", "k_proj", "bias")] = (kv,)
        s[("self_attn", "v_proj", "bias")] = (kv,)
    if cfg.mlp_bias:
        s[("mlp", "gate_proj", "bias")] = (F,)
        s[("mlp", "up_proj", "bias")] = (F,)
        s[("mlp", "down_proj", "bias")] = (D,)
    return s


def shell_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shapes of the non-layer tensors (embeddings, final norm, untied head)."""
    s = {
        ("embed_tokens", "weight"): (cfg.vocab_size, cfg.hidden_size),
        ("norm", "weight"): (cfg.hidden_size,),
    }
    if not cfg.tie_word_embeddings:
        s[("lm_head", "weight")] = (cfg.vocab_size, cfg.hidden_size)
    return s


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Every leaf of the params pytree (layer tensors with the stacked layer axis first)."""
    s = dict(shell_shapes(cfg))
    for p, shape in layer_shapes(cfg).items():
        s[("layers",) + p] = (cfg.num_hidden_layers,) + shape
    return s


def hf_names(cfg: ModelConfig) -> dict[str, tuple[Path, int | None]]:
    """HF tensor name -> (path in the pytree, layer index or None for shell tensors)."""
    out: dict[str, tuple[Path, int | None]] = {}
    for p in shell_shapes(cfg):
        out[hf_name(p)] = (p, None)
    for i in range(cfg.num_hidden_layers):
        for p in layer_shapes(cfg):
            out[hf_name(("layers",) + p, i)] = (("layers",) + p, i)
    return out


def hf_name(path: Path, layer: int | None = None) -> str:
    """The HF tensor name of a pytree leaf (with `layer` for stacked layer tensors)."""
    if path[0] == "layers":
        if layer is None:
            raise ValueError(f"layer index needed for {'/'.join(path)}")
        return f"model.layers.{layer}." + ".".join(path[1:])
    if path[0] == "lm_head":
        return "lm_head." + ".".join(path[1:])
    return "model." + ".".join(path)


def parse_hf_name(name: str) -> tuple[Path, int | None]:
    """Inverse of `hf_name` (no check that the tensor exists for a given config)."""
    m = _LAYER_RE.match(name)
    if m:
        return ("layers",) + tuple(m.group(2).split(".")), int(m.group(1))
    if name.startswith("lm_head."):
        return ("lm_head",) + tuple(name[len("lm_head."):].split(".")), None
    if name.startswith("model."):
        return tuple(name[len("model."):].split(".")), None
    raise ValueError(f"not a Llama-family tensor name: {name!r}")


def get_path(tree: dict, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def iter_leaves(tree: dict, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) pairs of a nested dict, in sorted key order."""
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, dict):
            yield from iter_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def to_hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, Any]]:
    """(HF tensor name, array) for every tensor of `params`, layer tensors split per layer."""
    for path in param_shapes(cfg):
        a = get_path(params, path)
        if path[0] == "layers":
            for i in range(cfg.num_hidden_layers):
                yield hf_name(path, i), a[i]
        else:
            yield hf_name(path), a
