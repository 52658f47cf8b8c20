"""Which tensors of a checkpoint form layer stacks and which stand alone, from names and config.json.

Architecture-agnostic (no decoder is needed to merge): a tensor is layer-indexed when its name holds
`.N.` (the first such index is the layer: `model.layers.3.mlp.up_proj.weight`,
`transformer.h.3.attn.c_attn.weight`, `model.language_model.layers.3...`, `vision_tower.encoder.layers.1...`);
all tensors sharing the text before that index form one stack. This is how mergekit 0.1.5 infers an
architecture it has no definition for; for the ones it defines (Llama, Mistral, Qwen, Gemma, Granite,
Phi, GPT-2, ...) it gives the same tensors. The other ("loose") tensors are split as mergekit's
definitions do: the final norms and heads come after the layers (in `slices` they are taken from the
last slice), the embeddings and everything else before (taken from the first slice).

Each stack's layer count is checked against config.json: the first of LAYER_KEYS at the top level
(a single stack) or in the sub-config that the stack's name points to (`text_config` for a language
model, `vision_config` for a vision tower); `slices` write the output's layer count there.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

LAYER_RE = re.compile(r"\.(\d+)\.")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# (words in a stack's name, sub-config that describes it)
_SUBCONFIG_HINTS = ((("language_model", "text", "llm", "decoder"), ("text_config", "language_config", "llm_config")),
                    (("vision", "visual", "image"), ("vision_config", "visual")),
                    (("audio", "speech"), ("audio_config",)))
_POST = re.compile(r"(^|\.)(lm_head|embed_out|output|score|classifier|pooler)(\.|$)|norm|(^|\.)ln_f\.")
TIED_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


class LayoutError(ValueError):
    """A checkpoint whose layer axis cannot be found or does not agree with its config.json."""


@dataclasses.dataclass(frozen=True)
class Stack:
    """The layers under one name prefix: layer i's tensors are f"{prefix}.{i}.{suffix}"."""

    prefix: str
    layers: tuple[tuple[str, ...], ...]  # per layer: the suffixes of its tensors
    config_key: str | None  # dotted config.json path of the layer count (None: none found)

    @property
    def n(self) -> int:
        return len(self.layers)

    def name(self, i: int, suffix: str) -> str:
        return f"{self.prefix}.{i}.{suffix}"


@dataclasses.dataclass(frozen=True)
class Layout:
    pre: tuple[str, ...]  # loose tensors before the layers (embeddings, projectors, ...)
    post: tuple[str, ...]  # loose tensors after the layers (final norms, heads)
    stacks: tuple[Stack, ...]

    def stack(self, prefix: str) -> Stack | None:
        return next((s for s in self.stacks if s.prefix == prefix), None)


def is_post(name: str) -> bool:
    """A final norm or an output head (mergekit's post_weights), never an embedding."""
    return "embed" not in name and bool(_POST.search(name))


def read_layout(names: list[str], config: Mapping[str, Any] | None, model: str) -> Layout:
    """The layout of one checkpoint from its tensor names (header order) and config.json dict.

    Raises LayoutError naming the tensor or config key when a stack skips a layer index or a config
    layer count disagrees with the tensors.
    """
    cfg_path = os.path.join(model, "config.json")
    stacks: dict[str, dict[int, list[str]]] = {}
    loose = []
    for name in names:
        m = LAYER_RE.search(name)
        if m is None:
            loose.append(name)
        else:
            stacks.setdefault(name[:m.start()], {}).setdefault(int(m.group(1)), []).append(name[m.end():])
    out = []
    for prefix, by_index in stacks.items():
        n = max(by_index) + 1
        gap = next((i for i in range(n) if i not in by_index), None)
        if gap is not None:
            raise LayoutError(f"model {model}: layer stack {prefix}: tensor {prefix}.{n - 1}.{by_index[n - 1][0]} "
                              f"exists but no tensor {prefix}.{gap}.* does (layers must be numbered 0..{n - 1})")
        key = _layer_key(config, prefix, len(stacks) == 1)
        if key is not None:
            value = get_dotted(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{cfg_path}: {key} is {value!r}; expected a positive integer (the number "
                                  f"of layers of {prefix})")
            if value != n:
                raise LayoutError(f"{cfg_path}: {key} is {value} but model {model} holds {n} layers of "
                                  f"{prefix} (tensors {prefix}.0.* to {prefix}.{n - 1}.*)")
        out.append(Stack(prefix=prefix, layers=tuple(tuple(by_index[i]) for i in range(n)), config_key=key))
    return Layout(pre=tuple(n for n in loose if not is_post(n)), post=tuple(n for n in loose if is_post(n)),
                  stacks=tuple(out))


def get_dotted(config: Mapping[str, Any] | None, key: str) -> Any:
    """config["a"]["b"] for key "a.b" (None where a level is missing or not an object)."""
    cur: Any = config
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def set_dotted(config: dict, key: str, value: Any) -> dict:
    """A copy of `config` with the (existing) dotted `key` set to `value`; nested objects are copied."""
    head, _, rest = key.partition(".")
    out = dict(config)
    out[head] = set_dotted(out[head], rest, value) if rest else value
    return out


def _layer_key(config: Mapping[str, Any] | None, prefix: str, single: bool) -> str | None:
    """The config.json path that holds the layer count of the stack under `prefix`, if any."""
    if not isinstance(config, Mapping):
        return None
    top = next((k for k in LAYER_KEYS if k in config), None)
    words = prefix.lower()
    for hints, subs in _SUBCONFIG_HINTS:
        if any(h in words for h in hints):
            for sub in subs:
                if isinstance(config.get(sub), Mapping):
                    k = next((k for k in LAYER_KEYS if k in config[sub]), None)
                    if k is not None:
                        return f"{sub}.{k}"
    if single and top is not None:
        return top
    return None


def tied_embedding(names: list[str] | set[str], head: str) -> str | None:
    """For a missing output head (`...lm_head.weight`), the input embedding it is tied to, if any."""
    if not head.endswith("lm_head.weight"):
        return None
    found = [n for n in names if LAYER_RE.search(n) is None and n.endswith(TIED_EMBEDDINGS)]
    return found[0] if len(found) == 1 else None
