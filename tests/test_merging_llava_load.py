"""A LLaVA merge written by hm3jax loads in transformers 5 with every tensor and gives the merged
model's logits. (mergekit 0.1.5 writes transformers 5's in-memory names and drops the language model
of such checkpoints, which transformers then initialises at random; see the README.)"""

from __future__ import annotations

import numpy as np
import pytest

from hm3jax.merging.stream import merge_recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _llava(path: str, seed: int) -> str:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                                     num_attention_heads=2, hidden_size=64, intermediate_size=128),
                      text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_attention_heads=4, num_hidden_layers=2),
                      image_seq_length=16)
    LlavaForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.slow
def test_llava_merge_loads_with_every_tensor(tmp_path):
    from transformers import LlavaForConditionalGeneration as Llava

    a, b = _llava(str(tmp_path / "a"), 0), _llava(str(tmp_path / "b"), 1)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]}
    merge_recipe(recipe, tmp_path / "out", progress=False)
    got, info = Llava.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = Llava.from_pretrained(a)
    sa, sb = ref.state_dict(), Llava.from_pretrained(b).state_dict()
    ref.load_state_dict({k: 0.3 * sa[k] + 0.7 * sb[k] for k in sa})
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        lg, lr = got(input_ids=ids).logits, ref(input_ids=ids).logits
        vg, vr = got.model.get_image_features(pixel_values=pixels), ref.model.get_image_features(pixel_values=pixels)
    np.testing.assert_allclose(lg.numpy(), lr.numpy(), atol=1e-5)
    for x, y in zip(vg if isinstance(vg, (list, tuple)) else [vg], vr if isinstance(vr, (list, tuple)) else [vr]):
        x, y = (getattr(t, "pooler_output", t) for t in (x, y))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
