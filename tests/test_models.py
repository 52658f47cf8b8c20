"""Decoder parity with transformers' PyTorch models, and layer-path execution."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hm3jax.models import (
    ConfigError,
    ModelConfig,
    PoolError,
    RopeScaling,
    build_pool,
    forward,
    forward_path,
    init_params,
    shell_of,
)
from hm3jax.models.params import param_shapes, to_hf_tensors

jax.config.update("jax_default_matmul_precision", "highest")


def random_params(cfg: ModelConfig, seed: int, dtype=jnp.float32) -> dict:
    """Params with every tensor random (norms around 1, biases non-zero) so parity is not trivial."""
    params = init_params(cfg, jax.random.key(seed), jnp.float32)
    key = jax.random.key(seed + 1)

    def perturb(path, a):
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF)
        noise = jax.random.normal(k, a.shape, jnp.float32)
        is_norm = "norm" in jax.tree_util.keystr(path)
        return (1.0 + 0.2 * noise if is_norm else 0.08 * noise).astype(dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def torch_model(cfg: ModelConfig, params: dict):
    d = cfg.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    sd = {n: torch.tensor(np.asarray(a, np.float32)) for n, a in to_hf_tensors(cfg, params)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing) == cfg.tie_word_embeddings or not missing, missing
    return model


FAMILIES = {
    "llama_gqa_untied": ModelConfig(model_type="llama", vocab_size=97, hidden_size=64,
                                    intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=8, num_key_value_heads=2),
    "llama_tied_mha": ModelConfig(model_type="llama", vocab_size=97, hidden_size=48,
                                  intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope_scaling": ModelConfig(
        model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)),
    "llama_attention_bias_headdim": ModelConfig(
        model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        attention_bias=True),
    "mistral_sliding_window": ModelConfig(model_type="mistral", vocab_size=97, hidden_size=64,
                                          intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1,
                                          sliding_window=5),
    "qwen2_bias_tied": ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_theta=1e6),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.slow
def test_logits_match_transformers(name):
    cfg = FAMILIES[name]
    params = random_params(cfg, seed=3)
    model = torch_model(cfg, params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 40))
    # right padding in row 1: positions past its length are not compared
    mask = np.ones((2, 40), np.int64)
    mask[1, 29:] = 0
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref).max() > 0.5  # logits are not trivially near zero


def test_config_roundtrip_through_transformers_both_spellings():
    cfg = FAMILIES["llama3_rope_scaling"]
    d = cfg.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    assert ModelConfig.from_hf_dict(hf_cfg.to_dict()) == cfg  # transformers 5 spelling
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert ModelConfig.from_hf_dict(legacy) == cfg  # transformers 4 spelling


def test_unsupported_config_errors():
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported; supported: llama"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
    d = FAMILIES["llama_gqa_untied"].to_hf_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ConfigError, match="rope type 'yarn'.*llama3"):
        ModelConfig.from_hf_dict(d)
    d = FAMILIES["llama_gqa_untied"].to_hf_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        ModelConfig.from_hf_dict(d)


def test_left_padding_matches_unpadded():
    cfg = FAMILIES["llama_gqa_untied"]
    params = random_params(cfg, seed=5)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12))
    padded = np.concatenate([np.zeros((1, 4), np.int64), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 4)), np.ones((1, 12))], axis=1).astype(np.int32)
    a = forward(cfg, params, jnp.asarray(tokens))
    b = forward(cfg, params, jnp.asarray(padded), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(b)[:, 4:], np.asarray(a), atol=1e-5)
    assert np.isfinite(np.asarray(b)).all()


def test_bfloat16_params_close_to_float32():
    cfg = FAMILIES["llama_gqa_untied"]
    p32 = random_params(cfg, seed=7)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)))
    l32, l16 = forward(cfg, p32, tokens), forward(cfg, p16, tokens)
    assert l16.dtype == jnp.float32
    assert float(jnp.abs(l32 - l16).max()) < 0.1 * float(jnp.abs(l32).max())


# ------------------------------------------------------------------------------ layer paths
CFG = FAMILIES["llama_gqa_untied"]


@pytest.fixture(scope="module")
def two_models():
    return random_params(CFG, seed=11), random_params(CFG, seed=12)


def _one_layer(params, i):
    return jax.tree.map(lambda a: a[i:i + 1], params["layers"])


def test_identity_path_equals_forward(two_models):
    a, _ = two_models
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 10)))
    pool = build_pool([a])
    np.testing.assert_array_equal(
        np.asarray(forward_path(CFG, shell_of(a), pool, np.arange(3), tokens)),
        np.asarray(forward(CFG, a, tokens)))


def test_cross_model_path_equals_hand_composed_model(two_models):
    a, b = two_models
    pool = build_pool([a, b], names=["a", "b"])
    steps = [("b", 2), ("a", 0), None, ("a", 0), ("b", 1), ("a", 2)]  # cross, repeat, skip, reorder
    path = pool.path(steps)
    assert pool.describe(path) == steps
    # the same network built by hand: a plain model whose layer stack is those layers in order
    src = {"a": a, "b": b}
    kept = [s for s in steps if s is not None]
    layers = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[_one_layer(src[m], l) for m, l in kept])
    hand = {**shell_of(a), "layers": layers}
    cfg_hand = CFG.replace(num_hidden_layers=len(kept))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 10)))
    got = forward_path(CFG, shell_of(a), pool, path, tokens)
    want = forward(cfg_hand, hand, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # and against transformers running that hand-built stack
    model = torch_model(cfg_hand, hand)
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(tokens))).logits.numpy()
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4


def test_vmap_over_paths_and_no_retrace(two_models):
    a, b = two_models
    pool = build_pool([a, b])
    shell = shell_of(b)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 8)))
    rng = np.random.default_rng(6)
    paths = rng.integers(-1, pool.size, (4, 5)).astype(np.int32)
    traces = []

    @jax.jit
    def score(p):
        traces.append(1)
        return jax.vmap(lambda q: forward_path(CFG, shell, pool, q, tokens))(p)

    batched = np.asarray(score(paths))
    for i in range(4):
        np.testing.assert_allclose(batched[i], np.asarray(forward_path(CFG, shell, pool, paths[i], tokens)),
                                   atol=1e-5)
    score(rng.integers(-1, pool.size, (4, 5)).astype(np.int32))
    score(rng.integers(-1, pool.size, (4, 5)).astype(np.int32))
    assert len(traces) == 1


def test_all_skip_path_is_embedding_through_head(two_models):
    a, _ = two_models
    pool = build_pool([a])
    tokens = jnp.asarray([[1, 2, 3]])
    got = forward_path(CFG, shell_of(a), pool, np.full(4, -1), tokens)
    zero = {**shell_of(a), "layers": jax.tree.map(lambda x: x[:0], a["layers"])}
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(forward(CFG.replace(num_hidden_layers=0), zero, tokens)),
                               atol=1e-6)


def test_pool_rejects_mismatched_widths_and_bad_paths(two_models):
    a, _ = two_models
    other_cfg = CFG.replace(intermediate_size=128)
    other = init_params(other_cfg, jax.random.key(0))
    with pytest.raises(PoolError, match=r"layers/mlp/down_proj/weight: model 'wide' has per-layer "
                                        r"shape \(64, 128\), model 'a' has \(64, 96\)"):
        build_pool([a, other], names=["a", "wide"])
    heads_cfg = CFG.replace(num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    with pytest.raises(PoolError, match="layer layout"):
        build_pool([a, a], cfgs=[CFG, heads_cfg])
    pool = build_pool([a])
    with pytest.raises(PoolError, match=r"outside the pool.*0\.\.2"):
        pool.check_path([0, 3])
    with pytest.raises(PoolError, match="no layer 7"):
        pool.lookup(0, 7)
    with pytest.raises(PoolError, match="no model 'expert9'; its models: model0"):
        pool.lookup("expert9", 0)
    # forward_path checks a concrete path as generate_path does (a traced one cannot be checked).
    shell, tokens = shell_of(a), jnp.ones((1, 3), jnp.int32)
    with pytest.raises(PoolError, match=r"outside the pool"):
        forward_path(CFG, shell, pool, [0, 5], tokens)
    with pytest.raises(ValueError, match="1-D array of pool indices"):
        forward_path(CFG, shell, pool, [[0, 1]], tokens)
    logits = jax.vmap(lambda p: forward_path(CFG, shell, pool, p, tokens))(jnp.asarray([[0, 1], [1, -1]]))
    assert logits.shape == (2, 1, 3, CFG.vocab_size)


def test_param_shapes_cover_init(two_models):
    a, _ = two_models
    from hm3jax.models.params import iter_leaves
    assert {p: tuple(x.shape) for p, x in iter_leaves(a)} == param_shapes(CFG)
