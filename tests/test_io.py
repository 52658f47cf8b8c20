"""hm3jax.io: safetensors reading/writing, HF directories, GGUF import, atomic output, errors."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from hm3jax.io import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    OutputExistsError,
    PickleCheckpointError,
    ShardedWriter,
    atomic_output_dir,
    load_gguf,
    load_pretrained,
    parse_size,
    save_pretrained,
)
from hm3jax.io.safetensors_io import INDEX_FILE
from hm3jax.models.config import ConfigError, ModelConfig
from hm3jax.models.params import get_path, hf_names, param_shapes, set_path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def random_params(cfg: ModelConfig, dtype=np.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in param_shapes(cfg).items():
        set_path(params, path, rng.standard_normal(shape).astype(np.float32).astype(dtype))
    return params


def hf_tensor(params: dict, name: str, cfg: ModelConfig) -> np.ndarray:
    path, layer = hf_names(cfg)[name]
    leaf = np.asarray(get_path(params, path))
    return leaf if layer is None else leaf[layer]


def assert_same_params(a: dict, b: dict, cfg: ModelConfig) -> None:
    for path in param_shapes(cfg):
        x, y = np.asarray(get_path(a, path)), np.asarray(get_path(b, path))
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def torch_to_numpy(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).numpy()


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kw,dtype,shard", [
    (dict(), np.float32, "5GB"),
    (dict(tie_word_embeddings=True), np.float32, "5GB"),
    (dict(), ml_dtypes.bfloat16, "5GB"),
    (dict(model_type="qwen2", tie_word_embeddings=True), ml_dtypes.bfloat16, "5GB"),
    (dict(), np.float32, 20_000),
])
def test_round_trip(tmp_path, kw, dtype, shard):
    cfg = tiny_cfg(**kw)
    params = random_params(cfg, dtype)
    out = tmp_path / "out"
    save_pretrained(out, cfg, params, max_shard_size=shard)
    assert listing(tmp_path) == ["out"]
    shards = [f for f in listing(out) if f.endswith(".safetensors")]
    if shard == 20_000:
        assert len(shards) > 2 and (out / INDEX_FILE).is_file()
    else:
        assert shards == ["model.safetensors"] and not (out / INDEX_FILE).exists()
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg.replace(torch_dtype=np.dtype(dtype).name)
    assert_same_params(params, params2, cfg)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_id


def test_load_casts_dtype(tmp_path):
    cfg = tiny_cfg()
    params = random_params(cfg)
    save_pretrained(tmp_path / "m", cfg, params, dtype="bfloat16")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    cfg2, p2 = load_pretrained(tmp_path / "m", dtype="float32")
    assert cfg2.torch_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(p2["norm"]["weight"]),
                                  params["norm"]["weight"].astype(ml_dtypes.bfloat16).astype(np.float32))
    save_pretrained(tmp_path / "again", cfg2, p2, max_shard_size=20_000)  # jax arrays in, too
    assert_same_params(p2, load_pretrained(tmp_path / "again")[1], cfg)


@pytest.mark.parametrize("kw,dtype", [
    (dict(), np.float32),
    (dict(tie_word_embeddings=True), ml_dtypes.bfloat16),
    (dict(model_type="qwen2"), np.float32),
])
def test_transformers_loads_our_checkpoint(tmp_path, kw, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(**kw)
    params = random_params(cfg, dtype)
    save_pretrained(tmp_path / "m", cfg, params, max_shard_size="10KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == (torch.bfloat16 if dtype is ml_dtypes.bfloat16 else torch.float32)
    sd = model.state_dict()
    for name in hf_names(cfg):
        np.testing.assert_array_equal(torch_to_numpy(sd[name]),
                                      hf_tensor(params, name, cfg).astype(np.float32), err_msg=name)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("tie", [False, True])
def test_read_transformers_sharded_checkpoint(tmp_path, tie):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_cfg(tie_word_embeddings=tie)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    sd = model.state_dict()
    with CheckpointReader(tmp_path / "hf") as reader:
        assert reader.config["model_type"] == "llama"
        assert len({reader.shard_of(n) for n in reader.names}) > 1
        for name in reader.names:
            arr = reader.get(name)
            assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap)
            assert reader.shape(name) == tuple(sd[name].shape) and reader.dtype(name) == np.float32
            np.testing.assert_array_equal(arr, torch_to_numpy(sd[name]))
    cfg2, params = load_pretrained(tmp_path / "hf")
    assert cfg2.tie_word_embeddings == tie and cfg2.num_hidden_layers == 2
    for name in hf_names(cfg2):
        np.testing.assert_array_equal(hf_tensor(params, name, cfg2), torch_to_numpy(sd[name]), err_msg=name)


def test_reader_bf16_and_other_dtypes(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int64),
               "c": torch.tensor([True, False]), "d": torch.randn(2, 2).half(), "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as r:
        assert r.config is None and sorted(r.names) == list("abcde")
        assert r.dtype("a") == ml_dtypes.bfloat16 and r.dtype("c") == np.bool_
        np.testing.assert_array_equal(r.get("a").astype(np.float32), torch_to_numpy(tensors["a"]))
        for k in "bcd":
            np.testing.assert_array_equal(r.get(k), tensors[k].numpy())
        assert r.get("e").shape == (0, 3)
        for k in "abcde":  # read: the same values, copied into an array of its own
            got = r.read(k)
            assert got.dtype == r.dtype(k) and got.shape == r.shape(k) and got.flags.writeable
            np.testing.assert_array_equal(got, r.get(k))


def test_reader_read_copies_without_mapping(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((700, 600)).astype(np.float32)  # over 1 MiB: an anonymous map of its own
    small = rng.standard_normal(10).astype(ml_dtypes.bfloat16)
    w = ShardedWriter(tmp_path, {"big": (big.shape, big.dtype), "small": (small.shape, small.dtype)},
                      max_shard_size=100)
    w.write("big", big)
    w.write("small", small)
    w.close()
    r = CheckpointReader(tmp_path)
    got = r.read("big")
    assert got.ctypes.data % 4096 == 0 and got.flags.writeable
    assert not r._maps  # nothing memory-mapped
    np.testing.assert_array_equal(got, big)
    got[0, 0] = 123.0  # a private copy: the file is unchanged
    np.testing.assert_array_equal(r.read("big"), big)
    np.testing.assert_array_equal(r.read("small"), small)
    fds = list(r._fds.values())
    r.close()
    assert not r._fds
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    np.testing.assert_array_equal(got[1:], big[1:])  # arrays outlive the reader's files
    np.testing.assert_array_equal(r.read("small"), small)  # reopened on demand
    with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
        r.read("nope")
    shard = r.shard_of("big")
    os.truncate(shard, os.path.getsize(shard) - 8)
    with pytest.raises(CheckpointError, match=r"'big' is truncated"):
        r.read("big")
    r.close()


# ---------------------------------------------------------------------------------- ShardedWriter
def test_sharded_writer_out_of_order(tmp_path):
    from safetensors.torch import load_file

    rng = np.random.default_rng(1)
    data = {f"t{i}": rng.standard_normal((10, 7 + i)).astype(np.float32) for i in range(6)}
    data["h"] = rng.standard_normal(5).astype(ml_dtypes.bfloat16)
    data["i"] = np.arange(3, dtype=np.int32)
    specs = {k: (v.shape, v.dtype) for k, v in data.items()}
    w = ShardedWriter(tmp_path, specs, max_shard_size=700)
    assert len(w.files) > 2
    for k in reversed(list(data)):
        w.write(k, data[k])
    w.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(data)
    loaded = {}
    for f in w.files:
        loaded.update(load_file(str(tmp_path / f)))
    for k, v in data.items():
        np.testing.assert_array_equal(torch_to_numpy(loaded[k]), v.astype(np.float32))
    with CheckpointReader(tmp_path) as r:
        for k, v in data.items():
            np.testing.assert_array_equal(r.get(k), v)
            np.testing.assert_array_equal(r.read(k), v)


def test_sharded_writer_errors(tmp_path):
    w = ShardedWriter(tmp_path, {"a": ((2, 3), np.float32), "b": ((4,), "bfloat16")})
    with pytest.raises(CheckpointError, match=r"'a'.*\[2, 3\].*\[3, 2\]"):
        w.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(CheckpointError, match="'a'.*float64"):
        w.write("a", np.zeros((2, 3)))
    with pytest.raises(CheckpointError, match="'zzz'"):
        w.write("zzz", np.zeros(1))
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(CheckpointError, match="never written: b"):
        w.close()
    with pytest.raises(CheckpointError, match="already holds safetensors files"):
        ShardedWriter(tmp_path, {"a": ((1,), np.float32)})


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234 and parse_size("10KB") == 10_000
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")


# ------------------------------------------------------------------------------------- bad inputs
def write_checkpoint(d, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    os.makedirs(d)
    cfg.to_json_file(os.path.join(d, "config.json"))
    with ShardedWriter(d, {k: (v.shape, v.dtype) for k, v in tensors.items()}) as w:
        for k, v in tensors.items():
            w.write(k, v)


def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    return {name: hf_tensor(params, name, cfg) for name in hf_names(cfg)}


def test_load_errors_name_the_tensors(tmp_path):
    cfg = tiny_cfg()
    t = hf_tensors(cfg, random_params(cfg))

    missing = dict(t)
    del missing["model.layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path / "missing", cfg, missing)
    with pytest.raises(CheckpointError, match=r"missing 1: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path / "missing")

    extra = {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32),
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    write_checkpoint(tmp_path / "extra", cfg, extra)
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.layers\.0\.self_attn\.q_proj\.bias$"):
        load_pretrained(tmp_path / "extra")

    wrong = {**t, "model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
    write_checkpoint(tmp_path / "shape", cfg, wrong)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight: expected \[16, 32\], found \[32, 32\]"):
        load_pretrained(tmp_path / "shape")


def test_tied_lm_head(tmp_path):
    cfg = tiny_cfg(tie_word_embeddings=True)
    params = random_params(cfg)
    t = hf_tensors(cfg, params)
    write_checkpoint(tmp_path / "same", cfg, {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    assert_same_params(params, load_pretrained(tmp_path / "same")[1], cfg)
    write_checkpoint(tmp_path / "diff", cfg, {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_pretrained(tmp_path / "diff")


def test_pickle_only_directory(tmp_path):
    import torch

    cfg = tiny_cfg()
    params = random_params(cfg, ml_dtypes.bfloat16)
    d = tmp_path / "pt"
    d.mkdir()
    cfg.to_json_file(d / "config.json")
    torch.save({k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
                for k, v in hf_tensors(cfg, params).items()}, d / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_pretrained(d)
    assert_same_params(params, load_pretrained(d, allow_pickle=True)[1], cfg)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        load_pretrained(tmp_path / "nope")
    cfg = tiny_cfg()
    d = tmp_path / "d"
    d.mkdir()
    cfg.to_json_file(d / "config.json")
    with pytest.raises(CheckpointNotFoundError, match="no weights found"):
        load_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json.*'gpt2'.*llama"):
        load_pretrained(d)

    good = tmp_path / "good"
    save_pretrained(good, cfg, random_params(cfg), max_shard_size=20_000)
    index = json.loads((good / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (good / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointNotFoundError, match=r"model-00009-of-00009\.safetensors"):
        load_pretrained(good)

    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 6) + b"{oops}" + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"corrupt.*model\.safetensors|model\.safetensors.*corrupt"):
        CheckpointReader(bad)


class _FailingLeaf:
    """Passes the shape check, then fails while its second layer is being written."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype

    def __getitem__(self, i):
        if i == 1:
            raise RuntimeError("disk on fire")
        return self.arr[i]


def test_save_errors_leave_nothing(tmp_path):
    cfg = tiny_cfg()
    params = random_params(cfg)
    before = listing(tmp_path)
    out = tmp_path / "out"

    bad = random_params(cfg)
    del bad["layers"]["mlp"]["up_proj"]
    with pytest.raises(CheckpointError, match=r"missing 1: model\.layers\.\*\.mlp\.up_proj\.weight"):
        save_pretrained(out, cfg, bad)
    bad = random_params(cfg)
    bad["layers"]["self_attn"]["q_proj"]["bias"] = np.zeros((2, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.layers\.\*\.self_attn\.q_proj\.bias"):
        save_pretrained(out, cfg, bad)
    bad = random_params(cfg)
    bad["norm"]["weight"] = np.zeros(31, np.float32)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*expected shape \[32\], found \[31\]"):
        save_pretrained(out, cfg, bad)
    bad = random_params(cfg)
    bad["layers"]["mlp"]["down_proj"]["weight"] = _FailingLeaf(bad["layers"]["mlp"]["down_proj"]["weight"])
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_pretrained(out, cfg, bad, max_shard_size=20_000)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_pretrained(tmp_path / "new" / "deeper" / "out", cfg, bad)
    assert listing(tmp_path) == before

    save_pretrained(out, cfg, params)
    before = listing(tmp_path)
    with pytest.raises(OutputExistsError, match=r"out.*overwrite=True"):
        save_pretrained(out, cfg, random_params(cfg, seed=1))
    with pytest.raises(RuntimeError):
        save_pretrained(out, cfg, bad, overwrite=True)
    assert listing(tmp_path) == before
    assert_same_params(params, load_pretrained(out)[1], cfg)
    params2 = random_params(cfg, seed=2)
    save_pretrained(out, cfg, params2, overwrite=True, max_shard_size=20_000)
    assert listing(tmp_path) == before
    assert "model.safetensors" not in listing(out)
    assert_same_params(params2, load_pretrained(out)[1], cfg)


def test_atomic_output_dir(tmp_path):
    with atomic_output_dir(tmp_path / "a") as tmp:
        assert os.path.basename(tmp).startswith(".a.tmp-") and not (tmp_path / "a").exists()
        open(os.path.join(tmp, "f"), "w").close()
    assert listing(tmp_path / "a") == ["f"]
    with pytest.raises(OutputExistsError), atomic_output_dir(tmp_path / "a"):
        raise AssertionError("body must not run")
    with pytest.raises(KeyError), atomic_output_dir(tmp_path / "a", overwrite=True) as tmp:
        raise KeyError("x")
    assert listing(tmp_path) == ["a"] and listing(tmp_path / "a") == ["f"]


# ----------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_copied_from_hf_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "temperature": 0.5}))
    cfg = tiny_cfg()
    save_pretrained(tmp_path / "out", cfg, random_params(cfg), tokenizer_from=src)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(listing(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["temperature"] == 0.5
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_pretrained(tmp_path / "out2", cfg, random_params(cfg), tokenizer_from=tmp_path / "empty" / ".")
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------------------- GGUF
# SmolLM2's GGUF against transformers: tests/test_real_weights.py (one load of each, shared).


def test_gguf_errors(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"general\.architecture is 'qwen2'.*llama"):
        load_pretrained(tmp_path / "q.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"x\.gguf"):
        load_gguf(tmp_path / "x.gguf")


def write_tiny_gguf(path, cfg: ModelConfig, params: dict, rope_freqs=None) -> None:
    """A llama GGUF laid out as llama.cpp's converter does (q/k rows permuted, F32 tensors)."""
    import gguf

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_tensor("token_embd.weight", params["embed_tokens"]["weight"])
    w.add_tensor("output_norm.weight", params["norm"]["weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", params["lm_head"]["weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name in hf_names(cfg):
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            t = hf_tensor(params, name, cfg)
            if module == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[module]}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_round_trip_and_transformers_parity(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(rope_theta=50000.0, rms_norm_eps=2.0**-17)  # exact in float32, as GGUF stores it
    params = random_params(cfg)
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, params)
    cfg2, params2 = load_pretrained(tmp_path / "tiny.gguf")
    assert cfg2 == cfg.replace(pad_token_id=None)
    assert_same_params(params, params2, cfg)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    sd = ref.state_dict()
    for name in hf_names(cfg):
        np.testing.assert_array_equal(hf_tensor(params2, name, cfg), sd[name].numpy(), err_msg=name)
    _, bf = load_gguf(tmp_path / "tiny.gguf", dtype="bfloat16")
    assert bf["layers"]["mlp"]["up_proj"]["weight"].dtype == ml_dtypes.bfloat16


def test_gguf_llama3_rope_freqs(tmp_path):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hm3jax.io.gguf import _llama3_rope_factors

    cfg = tiny_cfg(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(**{**cfg.to_hf_dict(), "rope_parameters": rope, "max_position_embeddings": 131072})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = _llama3_rope_factors(500000.0, 64, 8.0)
    np.testing.assert_allclose(factors, (base / scaled).numpy(), rtol=1e-5)

    write_tiny_gguf(tmp_path / "l3.gguf", cfg, random_params(cfg), rope_freqs=factors)
    got, _ = load_gguf(tmp_path / "l3.gguf")
    assert got.rope_scaling.rope_type == "llama3" and got.rope_scaling.factor == 8.0
    write_tiny_gguf(tmp_path / "odd.gguf", cfg, random_params(cfg), rope_freqs=factors * 1.5)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        load_gguf(tmp_path / "odd.gguf")


def test_write_json_atomic_replaces_whole_or_not_at_all(tmp_path):
    from hm3jax.io.atomic import write_json_atomic

    path = tmp_path / "front.json"
    write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"a": object()})  # fails mid-document
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old document, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["front.json"]  # no temporary left
