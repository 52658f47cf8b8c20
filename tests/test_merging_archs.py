"""Architecture-agnostic merges: tiny random checkpoints of each family transformers builds (Mistral,
Qwen2, Qwen3, Gemma, Granite, Phi, GPT-2, LLaVA) merged by hm3jax and by mergekit 0.1.5 (in-process)
with the same recipe give the same tensor names, values (max |diff| <= 1e-5) and layer counts."""

from __future__ import annotations

import functools
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from merging_zoo import read_all, run_mergekit

from hm3jax.merging.plan import PlanError
from hm3jax.merging.stream import merge_recipe

LAYERS = 3
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma", "granite", "phi", "gpt2", "llava")
# The number-of-layers key mergekit's definition names (None: mergekit infers the architecture).
LAYER_KEY = {"gpt2": "n_layer", "llava": None}


def _model(family: str):
    import transformers as T

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=96, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if family == "llava":
        vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8, projection_dim=32)
        cfg = T.LlavaConfig(text_config=T.LlamaConfig(**small), vision_config=vision, image_token_index=95)
        return T.LlavaForConditionalGeneration(cfg)
    cls = {"mistral": (T.MistralConfig, T.MistralForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
           "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM), "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
           "granite": (T.GraniteConfig, T.GraniteForCausalLM), "phi": (T.PhiConfig, T.PhiForCausalLM)}[family]
    extra = {"head_dim": 8} if family in ("qwen3", "gemma") else {}
    return cls[1](cls[0](**small, **extra))


def _write(path: str, tensors: dict, config: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@functools.cache
def family_zoo(family: str, root: str) -> dict[str, str]:
    """{"base", "ft1", "ft2"} directories of one family: a random model and two perturbed copies.

    LLaVA is written with the model's own (transformers 5) tensor names, which mergekit 0.1.5 loads;
    `save_pretrained` writes the legacy names (`language_model.model.layers.N`), see the test below.
    """
    import torch

    torch.manual_seed(0)
    model = _model(family)
    tmp = os.path.join(root, family, "_saved")
    model.save_pretrained(tmp, safe_serialization=True)
    config = json.load(open(os.path.join(tmp, "config.json")))
    if family == "llava":
        sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    else:
        sd = read_all(tmp)
    shutil.rmtree(tmp)
    rng = np.random.default_rng(1)
    paths = {"base": _write(os.path.join(root, family, "base"), sd, config)}
    for i in (1, 2):
        ft = {}
        for k, v in sd.items():
            noise = rng.normal(scale=0.02, size=v.shape).astype(np.float32) * (rng.random(v.shape) < 0.8)
            ft[k] = (v + noise).astype(np.float32)
        paths[f"ft{i}"] = _write(os.path.join(root, family, f"ft{i}"), ft, config)
    return paths


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("archs"))


def recipes(z: dict[str, str], family: str) -> dict[str, dict]:
    f32 = {"dtype": "float32"}
    out = {
        "linear": {**f32, "merge_method": "linear",
                   "models": [{"model": z["ft1"], "parameters": {"weight": [0.2, 0.9]}},
                              {"model": z["ft2"], "parameters": {"weight": 0.5}}]},
        "ties": {**f32, "merge_method": "ties", "base_model": z["base"],
                 "models": [{"model": z["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": z["ft2"], "parameters": {"weight": 0.4, "density": [0.3, 0.9]}}]},
        "slerp_gradient": {**f32, "merge_method": "slerp", "base_model": z["base"],
                           "models": [{"model": z["ft1"]}],
                           "parameters": {"t": [{"filter": "mlp", "value": [0, 0.5, 1]}, {"value": [1, 0.3]}]}},
    }
    if family != "llava":  # mergekit needs its `modules` syntax for slices of a multi-stack model
        out["passthrough_slices"] = {
            **f32, "merge_method": "passthrough",
            "slices": [{"sources": [{"model": z["ft1"], "layer_range": [0, 2]}]},
                       {"sources": [{"model": z["ft2"], "layer_range": [1, LAYERS]}]}]}
    return out


CASES = [(f, m) for f in FAMILIES for m in ("linear", "ties", "slerp_gradient", "passthrough_slices")
         if not (f == "llava" and m == "passthrough_slices")]


def _compare(ref_dir: str, got_dir: str, family: str) -> None:
    ref, got = read_all(ref_dir), read_all(got_dir)
    assert sorted(got) == sorted(ref)
    worst = max((float(np.max(np.abs(ref[k] - got[k]))), k) for k in ref)
    assert worst[0] <= 1e-5, f"max |diff| {worst[0]:.3g} at {worst[1]}"
    key = LAYER_KEY.get(family, "num_hidden_layers")
    if key is not None:
        cfg_ref = json.load(open(os.path.join(ref_dir, "config.json")))
        cfg_got = json.load(open(os.path.join(got_dir, "config.json")))
        assert cfg_got[key] == cfg_ref[key]


@pytest.mark.slow
@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_family_matches_mergekit(root, tmp_path, family, method):
    z = family_zoo(family, root)
    recipe = recipes(z, family)[method]
    per_layer = "layer_types" in json.load(open(os.path.join(z["base"], "config.json")))
    if method == "passthrough_slices" and per_layer:
        # mergekit 0.1.5 writes the tensors, then fails to save the config (len(layer_types) !=
        # num_hidden_layers); hm3jax re-indexes layer_types for the output's layers.
        with pytest.raises(Exception, match="layer_types"):
            run_mergekit(recipe, str(tmp_path / "mergekit"))
    else:
        run_mergekit(recipe, str(tmp_path / "mergekit"))
    merge_recipe(recipe, tmp_path / "hm3jax", progress=False)
    if method == "passthrough_slices" and per_layer:
        import transformers

        shutil.copyfile(os.path.join(z["base"], "config.json"), tmp_path / "mergekit" / "config.json")
        cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hm3jax")  # loadable
        assert cfg.num_hidden_layers == len(cfg.layer_types) == 4
        ref = json.load(open(os.path.join(z["base"], "config.json")))["layer_types"]
        assert cfg.layer_types == ref[:2] + ref[1:]
        read_all(str(tmp_path / "hm3jax"))
        ref_t, got_t = read_all(str(tmp_path / "mergekit")), read_all(str(tmp_path / "hm3jax"))
        assert sorted(got_t) == sorted(ref_t)
        assert all(np.array_equal(ref_t[k], got_t[k]) for k in ref_t)
        return
    _compare(str(tmp_path / "mergekit"), str(tmp_path / "hm3jax"), family)


@pytest.mark.slow
def test_gpt2_slices_write_n_layer(root, tmp_path):
    recipe = recipes(family_zoo("gpt2", root), "gpt2")["passthrough_slices"]
    merge_recipe(recipe, tmp_path / "out", progress=False)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["n_layer"] == 4 and "num_hidden_layers" not in cfg
    assert "transformer.h.3.attn.c_attn.weight" in read_all(str(tmp_path / "out"))


@pytest.mark.slow
def test_llava_legacy_names_keep_every_tensor(root, tmp_path):
    """`save_pretrained` writes LLaVA with legacy names (language_model.model.layers.N...); mergekit 0.1.5
    drops the whole language model there. hm3jax merges every tensor under its own name, with the
    values of the same merge of the same weights under the new names."""
    z = family_zoo("llava", root)
    rename = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
              "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}

    def legacy_name(n):
        new = next(o for o in rename if n.startswith(o))
        return rename[new] + n[len(new):]

    legacy = {}
    for k in ("ft1", "ft2"):
        config = json.load(open(os.path.join(z[k], "config.json")))
        legacy[k] = _write(str(tmp_path / k), {legacy_name(n): v for n, v in read_all(z[k]).items()}, config)
    recipe = {**recipes(z, "llava")["slerp_gradient"], "base_model": legacy["ft1"], "models": [{"model": legacy["ft2"]}]}
    merge_recipe(recipe, tmp_path / "legacy", progress=False)
    new = {**recipe, "base_model": z["ft1"], "models": [{"model": z["ft2"]}]}
    merge_recipe(new, tmp_path / "new", progress=False)
    got, ref = read_all(str(tmp_path / "legacy")), read_all(str(tmp_path / "new"))
    assert sorted(got) == sorted(legacy_name(n) for n in ref) and len(got) == 73
    assert any(n.startswith("language_model.model.layers.2.") for n in got)
    for n, v in ref.items():
        np.testing.assert_array_equal(got[legacy_name(n)], v, err_msg=n)


# ------------------------------------------------------------------------------ clear errors
def _gpt2_pair(tmp_path, **config_changes):
    rng = np.random.default_rng(0)
    tensors = {"transformer.wte.weight": rng.normal(size=(8, 4)).astype(np.float32)}
    for i in range(2):
        tensors[f"transformer.h.{i}.ln_1.weight"] = rng.normal(size=(4,)).astype(np.float32)
    tensors["transformer.ln_f.weight"] = rng.normal(size=(4,)).astype(np.float32)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, **config_changes}
    config = {k: v for k, v in config.items() if v is not None}
    return [_write(str(tmp_path / n), tensors, config) for n in ("a", "b")]


@pytest.mark.parametrize("change,form,expect", [
    ({"n_layer": 3}, "models", r"a/config\.json: n_layer is 3 but model .*a holds 2 layers of transformer\.h"),
    ({"n_layer": "two"}, "models", r"a/config\.json: n_layer is 'two'; expected a positive integer"),
    ({"n_layer": None}, "slices", r"a/config\.json: no layer count for transformer\.h \(looked for "
                                  r"num_hidden_layers, n_layer"),
    ({"n_layer": None}, "models", None),  # the `models` form needs no count from the config
])
def test_layer_axis_errors_name_the_key(tmp_path, change, form, expect):
    a, b = _gpt2_pair(tmp_path, **change)
    if form == "models":
        recipe = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                       {"model": b, "parameters": {"weight": 1.0}}]}
    else:
        recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}]},
                                                            {"sources": [{"model": b, "layer_range": [0, 2]}]}]}
    if expect is None:
        merge_recipe(recipe, tmp_path / "out", progress=False)
        assert "transformer.h.1.ln_1.weight" in read_all(str(tmp_path / "out"))
        return
    with pytest.raises(PlanError, match=expect):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gap_in_layer_numbers_and_multi_stack_slices(tmp_path):
    a, b = _gpt2_pair(tmp_path)
    from safetensors.numpy import load_file, save_file

    t = load_file(os.path.join(a, "model.safetensors"))
    t["transformer.h.3.ln_1.weight"] = t.pop("transformer.h.1.ln_1.weight")
    save_file(t, os.path.join(a, "model.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                   {"model": b, "parameters": {"weight": 1.0}}]}
    with pytest.raises(PlanError, match=r"tensor transformer\.h\.3\.ln_1\.weight exists but no tensor "
                                        r"transformer\.h\.1\.\* does"):
        merge_recipe(recipe, tmp_path / "out", progress=False)
    t["vision.layers.0.w"] = t["transformer.ln_f.weight"]
    t["transformer.h.1.ln_1.weight"] = t.pop("transformer.h.3.ln_1.weight")
    save_file(t, os.path.join(b, "model.safetensors"))
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": b, "layer_range": [0, 1]}]}]}
    with pytest.raises(PlanError, match=r"has 2 layer stacks \(transformer\.h, vision\.layers\); `slices` take one"):
        merge_recipe(sliced, tmp_path / "out", progress=False)


def test_non_float_buffers_are_copied_when_the_inputs_agree(tmp_path):
    """As mergekit: an integer buffer (CLIP's position_ids in older checkpoints) is copied, not merged;
    inputs that disagree on it are refused, naming the tensor."""
    from safetensors.numpy import load_file, save_file

    a, b = _gpt2_pair(tmp_path)
    ids = np.arange(16, dtype=np.int64)[None]
    for m in (a, b):
        t = load_file(os.path.join(m, "model.safetensors"))
        save_file({**t, "transformer.position_ids": ids}, os.path.join(m, "model.safetensors"))
    recipe = {"merge_method": "ties", "base_model": a, "dtype": "float16",
              "models": [{"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]}
    merge_recipe(recipe, tmp_path / "out", progress=False)
    from hm3jax.io.safetensors_io import CheckpointReader

    r = CheckpointReader(str(tmp_path / "out"))
    assert r.dtype("transformer.position_ids") == np.int64
    np.testing.assert_array_equal(r.read("transformer.position_ids"), ids)
    assert r.dtype("transformer.wte.weight") == np.float16
    t = load_file(os.path.join(b, "model.safetensors"))
    save_file({**t, "transformer.position_ids": ids + 1}, os.path.join(b, "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor transformer\.position_ids: a non-float buffer \(int64\) whose "
                                         r"values differ between the models"):
        merge_recipe(recipe, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
