"""The output vocabulary of a merge and the embedding/head rows rebuilt for it, as mergekit 0.1.5 does.

`tokenizer_source: base | union | <model>` (or `tokenizer: {source, tokens, pad_to_multiple_of}`,
whose source defaults to `union`) picks the output tokenizer: the base model's (the first model's
without a base), with tokens past its model's `vocab_size` stripped (BPE only); the union of every
input's vocabulary (the base's tokens keep their ids, the others are appended as added tokens, model
by model in the order the recipe names them, each model's in id order; mergekit appends them in its
tokenizer's hash-map order and models in Python's set order, so its ids for them change from run to
run); or a named model's. Each `tokens` key missing from it is added.

Then every vocabulary-indexed tensor (input embeddings and output heads, rows = tokens) of every input
is re-indexed to the output vocabulary before the merge: a token a model has keeps that model's row;
a token it lacks takes a stand-in row: from the one model that has it, else the base model's, else
the mean over the models that have it, or as `tokens` says (`source: <model>`, `{kind: zero}`,
`{kind: model_token, model, token | token_id}`; `force: true` uses it even where a model has the
token). Rows past the vocabulary, up to `pad_to_multiple_of`, are the mean of the others.
Transformers (fast tokenizers) reads and writes the tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hm3jax.merging.layout import get_dotted

# Names of input embeddings and output heads (row = token), as mergekit's definitions mark them.
VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                 "lm_head.weight", "lm_head.bias", "embed_out.weight")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


class VocabError(ValueError):
    """A tokenizer setting that cannot be honoured; the message names the model, token or key."""


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Where a token's stand-in row comes from: kind "model" (that model's row of the token), "zero",
    or "model_token" (a model's row of another `token` / `token_id`); `force`: also where a model has it."""

    kind: str | None = None
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


# ------------------------------------------------------------------------------------------ parsing
def parse_tokenizer(raw: Mapping[str, Any], where: str) -> tuple[str, dict[str, TokenSpec], int | None]:
    """(source, tokens, pad_to_multiple_of) of a recipe's `tokenizer:` mapping (its known keys);
    VocabError if malformed."""
    source = raw.get("source", "union")
    if not isinstance(source, str) or not source:
        raise VocabError(f"{where}.source: expected 'base', 'union' or a model path, got {source!r}")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise VocabError(f"{where}.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = raw.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise VocabError(f"{where}.tokens: expected a mapping of token -> {{source, force}}")
    return source, {str(t): _token_spec(v, f"{where}.tokens[{t!r}]") for t, v in tokens.items()}, pad


def _token_spec(v: Any, where: str) -> TokenSpec:
    if v is None:
        return TokenSpec()
    if not isinstance(v, Mapping) or set(v) - {"source", "force"}:
        raise VocabError(f"{where}: expected a mapping with 'source' and/or 'force'")
    force = v.get("force", False)
    if not isinstance(force, bool):
        raise VocabError(f"{where}.force: expected true or false, got {force!r}")
    src = v.get("source")
    if src is None:
        return TokenSpec(force=force)
    if isinstance(src, str):
        return TokenSpec(kind="model", model=src, force=force)
    if isinstance(src, Mapping) and src.get("kind") == "zero" and set(src) == {"kind"}:
        return TokenSpec(kind="zero", force=force)
    if (isinstance(src, Mapping) and src.get("kind") == "model_token" and isinstance(src.get("model"), str)
            and set(src) <= {"kind", "model", "token", "token_id"} and (("token" in src) != ("token_id" in src))):
        tid = src.get("token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            raise VocabError(f"{where}.source.token_id: expected a non-negative integer, got {tid!r}")
        return TokenSpec(kind="model_token", model=src["model"], token=src.get("token"), token_id=tid, force=force)
    raise VocabError(f"{where}.source: expected a model path, {{kind: zero}} or {{kind: model_token, model, "
                     f"token | token_id}}, got {src!r}")


# ------------------------------------------------------------------------------------------ building
@dataclasses.dataclass
class Vocabulary:
    """The output tokenizer and, per input model, where each output token's row comes from."""

    tokenizer: Any  # a transformers tokenizer (saved next to the merged weights)
    vocab: dict[str, int]  # output token -> id
    size: int  # output rows (len(vocab) rounded up to pad_to_multiple_of)
    rows: dict[str, np.ndarray]  # model -> [len(vocab)] row of each output token in that model, or -1
    original: dict[str, dict[str, int]]  # model -> its own vocabulary
    tokens: dict[str, TokenSpec]
    base: str  # whose tokenizer is the starting point
    merge_base: str | None  # the recipe's base model, whose rows stand in for tokens others lack


def vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """The model's embedding rows per its config.json (`vocab_size`, else `text_config.vocab_size`)."""
    for key in ("vocab_size", "text_config.vocab_size"):
        v = get_dotted(config, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _load_tokenizer(path: str):
    # hm3jax.merging needs only jax, numpy, ml_dtypes, pyyaml at import (pyproject.toml): loaded where used
    from transformers import AutoTokenizer

    from hm3jax.io.paths import check_tokenizer_files

    check_tokenizer_files(path)  # a FIFO named like a tokenizer file would block from_pretrained
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:
        raise VocabError(f"model {path}: its tokenizer does not load ({type(e).__name__}: {e})"[:400]) from None


def _stripped(path: str, tok, n: int | None):
    """The base tokenizer without tokens at ids >= its model's vocab_size (BPE only, as mergekit)."""
    if n is None:
        return tok
    unused = {t for t, i in tok.get_vocab().items() if i >= n}
    if not unused:
        return tok
    spec = json.loads(tok._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise VocabError(f"model {path}: its tokenizer has {len(unused)} token(s) at ids >= vocab_size {n} "
                         f"and is of type {spec['model']['type']}; only BPE ones can be stripped")
    # hm3jax.merging needs only jax, numpy, ml_dtypes, pyyaml at import (pyproject.toml): loaded where used
    import tokenizers

    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < n]
    for t in unused:
        spec["model"]["vocab"].pop(t, None)
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tok


def build_vocabulary(source: str, tokens: Mapping[str, TokenSpec], base: str | None, models: Sequence[str],
                     configs: Mapping[str, Mapping[str, Any] | None], pad: int | None = None) -> Vocabulary:
    """The output tokenizer and row maps (module docstring). `models`: every input, in recipe order."""
    merge_base, base = base, base or models[0]
    sizes = {m: vocab_size(configs.get(m)) for m in models}
    toks = {base: _stripped(base, _load_tokenizer(base), sizes.get(base))}
    for m in models:
        if m not in toks:
            if not any(os.path.isfile(os.path.join(m, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                    "tokenizer_config.json", "vocab.json")):
                warnings.warn(f"model {m} has no tokenizer; taking it to be {base}'s", stacklevel=2)
                continue
            toks[m] = _load_tokenizer(m)
    if source == "base":
        out = toks[base]
    elif source == "union":
        out = _union(toks, sizes, base)
    else:
        out = _load_tokenizer(source)
    have = set(out.get_vocab())
    for t in tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = dict(out.get_vocab())
    size = len(vocab)
    if pad and size % pad:
        size += pad - size % pad
    rows = {}
    for m in models:
        own = (toks.get(m) or toks[base]).get_vocab()
        n = sizes.get(m) or len(own)
        r = np.full(len(vocab), -1, np.int64)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < n:
                r[i] = j
        rows[m] = r
    for t, spec in tokens.items():
        if spec.model is not None and spec.model not in rows:
            raise VocabError(f"tokenizer.tokens[{t!r}]: model {spec.model} is not an input of the merge")
    return Vocabulary(tokenizer=out, vocab=vocab, size=size, rows=rows,
                      original={m: dict(tk.get_vocab()) for m, tk in toks.items()}, tokens=dict(tokens), base=base,
                      merge_base=merge_base)


def _union(toks: Mapping[str, Any], sizes: Mapping[str, int | None], base: str):
    # hm3jax.merging needs only jax, numpy, ml_dtypes, pyyaml at import (pyproject.toml): loaded where used
    import tempfile

    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m, tok in toks.items():
        n = sizes.get(m) or tok.vocab_size
        special = tok.added_tokens_decoder
        names = {info.content for info in special.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):  # id order: reproducible
            if i < n and t not in names:
                plain.setdefault(t)
        for i, info in special.items():
            if i < n:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:  # a copy: the base tokenizer itself stays as it is
        toks[base].save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d, use_fast=True)
    own = toks[base].get_vocab()
    for t in plain:
        if t not in added and t not in own:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


# ------------------------------------------------------------------------------------------ rows
def rebuild_rows(v: Vocabulary, arrays: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Each model's rows of one vocabulary-indexed tensor (axis 0) re-indexed to the output vocabulary.

    arrays: model -> [rows, *rest] in the dtype the merge loads (mergekit averages stand-in rows in it).
    Returns model -> [v.size, *rest].
    """
    models = list(arrays)
    rest = {a.shape[1:] for a in arrays.values()}
    if len(rest) > 1:
        raise VocabError(f"tensor {name}: non-vocabulary dimensions differ: "
                         + ", ".join(f"{m} {list(a.shape)}" for m, a in arrays.items()))
    dtype = np.result_type(*arrays.values())
    shape = next(iter(rest))
    specs, average = _assign(v, models)
    stand_in = {}
    for t, i in v.vocab.items():
        spec = specs.get(t)
        if not (spec and spec.force) and all(v.rows[m][i] >= 0 for m in models):
            continue
        if t in average:
            have = [m for m in models if v.rows[m][i] >= 0]
            acc = np.zeros(shape, dtype)
            for m in have:
                acc = (acc + arrays[m][v.rows[m][i]]).astype(dtype)
            stand_in[t] = (acc / np.asarray(len(have), dtype)).astype(dtype)
        elif spec is not None and spec.kind is not None:
            stand_in[t] = _spec_row(v, spec, arrays, t, i, shape, dtype, name)
    forced = np.zeros(len(v.vocab), bool)
    forced[[v.vocab[t] for t, spec in specs.items() if spec.force and t in v.vocab]] = True
    out = {}
    for m in models:
        new = np.zeros((v.size, *shape), dtype)
        r = v.rows[m]
        own = (r >= 0) & ~forced
        new[np.flatnonzero(own)] = arrays[m][r[own]]
        for t, row in stand_in.items():
            if not own[v.vocab[t]]:
                new[v.vocab[t]] = row
        if v.size > len(v.vocab):
            new[len(v.vocab):] = new[:len(v.vocab)].astype(np.float32).mean(axis=0).astype(dtype)
        out[m] = new
    return out


def _assign(v: Vocabulary, models: list[str]) -> tuple[dict[str, TokenSpec], set[str]]:
    """Stand-in sources for tokens some model lacks (module docstring), and the ones to average."""
    specs, average = dict(v.tokens), set()
    for t, i in v.vocab.items():
        if t in specs:
            continue
        has = [m for m in models if v.rows[m][i] >= 0]
        if len(has) == 1:
            specs[t] = TokenSpec(kind="model", model=has[0])
        elif not has:
            specs[t] = TokenSpec(kind="zero")
            warnings.warn(f"token {t!r} is in no input model; its rows are zero", stacklevel=3)
        elif v.merge_base in models and v.rows[v.merge_base][i] >= 0:
            specs[t] = TokenSpec(kind="model", model=v.merge_base)
        else:
            average.add(t)
    return specs, average


def _spec_row(v: Vocabulary, spec: TokenSpec, arrays, t: str, i: int, shape, dtype, name: str) -> np.ndarray:
    if spec.kind == "zero":
        return np.zeros(shape, dtype)
    if spec.model not in arrays:
        raise VocabError(f"tensor {name}: token {t!r} takes its row from model {spec.model}, which is not an "
                         "input of this tensor")
    src = arrays[spec.model]
    if spec.kind == "model_token":
        j = spec.token_id
        if j is None:
            j = v.original.get(spec.model, v.original[v.base]).get(spec.token)
            if j is None:
                raise VocabError(f"tokenizer.tokens[{t!r}]: token {spec.token!r} is not in model {spec.model}")
        if not 0 <= j < src.shape[0]:
            raise VocabError(f"tokenizer.tokens[{t!r}]: token_id {j} is out of range for model {spec.model} "
                             f"({src.shape[0]} rows of {name})")
        return src[j]
    j = v.rows[spec.model][i]
    if j < 0:
        raise VocabError(f"tokenizer.tokens[{t!r}]: token {t!r} is not in model {spec.model}")
    return src[j]
