"""Seeded fuzzing of the safetensors header parser and the GGUF reader.

Small valid files are mutated (bit flips, byte and integer overwrites, truncation, insertion, and
for safetensors, field-level rewrites of the JSON header with adversarial values); every mutant is
read through hm3jax. Reading may succeed or raise hm3jax's own errors (CheckpointError, ConfigError);
any other exception fails the test, listing the first mutants that raised it. Fixed iteration
counts and seeds, so a failure reproduces.

Findings (these seeds, run against the code before issue 13's fixes): safetensors, 50 of 3000
mutants raised foreign errors: TypeError 47 (e.g. a list as dtype: "unhashable type: 'list'"),
OverflowError 2 (a huge dimension overflowing np.prod's int64), ValueError 1 (negative dimensions);
GGUF, 346 of the first 1088 mutants raised IndexError from inside the gguf package, and mutant 1089
(one flipped bit making llama.block_count 33,554,433) hung load_gguf, which enumerated the tensor
names of 33 million layers before comparing them with the file. After the fixes none: safetensors
2809 CheckpointError and 191 read; GGUF 1113 CheckpointError, 1 ConfigError and 86 read.
"""

from __future__ import annotations

import collections
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from hm3jax.io import CheckpointError, CheckpointReader, load_gguf
from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.models.config import ConfigError, ModelConfig
from hm3jax.models.params import hf_names, param_shapes

OWN_ERRORS = (CheckpointError, ConfigError)
SAFETENSORS_ITERATIONS = 3000
GGUF_ITERATIONS = 1200

ODD_VALUES = [None, True, False, -1, 0, 1, 7, 2**31, 2**63, 2**64 + 1, 10**30, -(2**63), 1.5, 1e308,
              "0", "F32", "", "x" * 300, [], [0], [0, 1, 2], ["0", "8"], [[0], [8]], [-8, 0], [8, 0],
              [0, 2**64], {}, {"a": 1}, [None, None], [1.0, 2.0], [True, False]]
CODES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "f32", "Q4_0", "", "I16"]


def _valid_safetensors(path) -> bytes:
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((4, 6)).astype(np.float32),
               "h": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
               "i": np.arange(5, dtype=np.int64), "e": np.zeros((0, 3), np.float16),
               "b": np.array([True, False, True])}
    with ShardedWriter(path, {k: (v.shape, v.dtype) for k, v in tensors.items()}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        return f.read()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, rng, lie: bool) -> bytes:
    raw = json.dumps(header).encode()
    n = len(raw)
    if lie:
        n = int(rng.choice([0, 1, n - 1, n + 1, n + 8, 2**63, 2**64 - 1, 100 * 2**20 + 1, len(raw) + len(body)]))
    return struct.pack("<Q", n % 2**64) + raw + body


def _mutate_safetensors(valid: bytes, rng) -> bytes:
    header, body = _split(valid)
    n = struct.unpack("<Q", valid[:8])[0]
    kind = rng.integers(9)
    data = bytearray(valid)
    if kind == 0:  # bit flips in the length and header
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(0, 8 + n))
            data[pos] ^= 1 << int(rng.integers(8))
        return bytes(data)
    if kind == 1:  # random bytes over the header
        pos = int(rng.integers(0, 8 + n))
        data[pos:pos + int(rng.integers(1, 9))] = rng.integers(0, 256, int(rng.integers(1, 9)), np.uint8).tobytes()
        return bytes(data)
    if kind == 2:  # truncate anywhere
        return bytes(data[:int(rng.integers(0, len(data)))])
    if kind == 3:  # digits changed in the JSON text: valid JSON, wrong numbers
        text = bytearray(data[8:8 + n])
        digits = [i for i, c in enumerate(text) if chr(c).isdigit()]
        for i in rng.choice(digits, size=min(len(digits), int(rng.integers(1, 4))), replace=False):
            text[i] = ord(str(rng.integers(10)))
        return bytes(data[:8] + text + data[8 + n:])
    if kind == 4:  # non-UTF-8 or control bytes inside a string
        text = bytearray(data[8:8 + n])
        pos = int(rng.integers(0, len(text)))
        text[pos:pos] = bytes(rng.choice([b"\xff", b"\xc3", b"\x00", b"\\", b'"', b"\xed\xa0\x80"]))
        return struct.pack("<Q", len(text)) + bytes(text) + data[8 + n:]
    # field-level rewrites of a parsed header
    names = [k for k in header if k != "__metadata__"]
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    if kind == 5:
        field = ["dtype", "shape", "data_offsets"][int(rng.integers(3))]
        entry[field] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    elif kind == 6:
        entry["dtype"] = CODES[int(rng.integers(len(CODES)))]
    elif kind == 7:
        choice = int(rng.integers(5))
        if choice == 0:
            del entry[["dtype", "shape", "data_offsets"][int(rng.integers(3))]]
        elif choice == 1:
            header[name] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        elif choice == 2:
            header["__metadata__"] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        elif choice == 3:
            other = names[int(rng.integers(len(names)))]
            entry["data_offsets"] = list(header[other]["data_offsets"])  # overlap another tensor
        else:
            header = [header] if rng.integers(2) else "header"
    else:
        entry["shape"] = [int(x) for x in rng.integers(0, 9, int(rng.integers(0, 4)))]
    return _join(header, body, rng, lie=bool(rng.integers(4) == 0))


def _read_everything(path):
    with CheckpointReader(path) as r:
        for name in r.names:
            r.shape(name)
            r.dtype(name)
            a, b = r.get(name), r.read(name)
            assert a.shape == b.shape == r.shape(name)
            assert a.tobytes() == b.tobytes()


def _run(kind_of_file, iterations, mutate, read, tmp_path, valid, seed):
    rng = np.random.default_rng(seed)
    outcomes: collections.Counter = collections.Counter()
    failures = []
    for i in range(iterations):
        data = mutate(valid, rng)
        target = tmp_path / kind_of_file
        target.write_bytes(data)
        try:
            read(target)
            outcomes["read"] += 1
        except OWN_ERRORS as e:
            outcomes[type(e).__name__] += 1
        except Exception as e:  # anything else is a finding
            outcomes["FOREIGN " + type(e).__name__] += 1
            if len(failures) < 5:
                failures.append(f"iteration {i}: {type(e).__name__}: {str(e)[:200]}")
    print(f"{kind_of_file}: {iterations} mutants, outcomes {dict(outcomes)}")
    assert not failures, "\n".join(failures)
    return outcomes


def test_fuzz_safetensors_header(tmp_path):
    src = tmp_path / "src"
    valid = _valid_safetensors(src)
    _read_everything(src)
    d = tmp_path / "fuzz"
    d.mkdir()
    outcomes = _run("model.safetensors", SAFETENSORS_ITERATIONS, _mutate_safetensors,
                    lambda p: _read_everything(p.parent), d, valid, seed=13)
    assert outcomes["CheckpointError"] > SAFETENSORS_ITERATIONS // 2 and outcomes["read"] > 0


# --------------------------------------------------------------------------------------------- GGUF
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _valid_gguf(path) -> bytes:
    import gguf

    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    shapes = param_shapes(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (p, layer) in hf_names(cfg).items():
        shape = shapes[p][1:] if layer is not None else shapes[p]
        t = rng.standard_normal(shape).astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_GGUF_LAYER[module]}.{kind}"
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


def _mutate_gguf(valid: bytes, rng) -> bytes:
    data = bytearray(valid)
    kind = rng.integers(5)
    meta_end = min(len(data), 1200)  # header, key/values and tensor table come first
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(0, meta_end))
            data[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # a counter, length or offset set to a boundary value
        pos = int(rng.integers(4, meta_end - 8))
        value = int(rng.choice([0, 1, 2, 3, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]))
        width = int(rng.choice([4, 8]))
        data[pos:pos + width] = (value % 2**(8 * width)).to_bytes(width, "little")
    elif kind == 2:
        return bytes(data[:int(rng.integers(0, len(data)))])
    elif kind == 3:
        pos = int(rng.integers(0, meta_end))
        del data[pos:pos + int(rng.integers(1, 16))]
    else:
        pos = int(rng.integers(0, meta_end))
        data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), np.uint8).tobytes()
    return bytes(data)


def test_fuzz_gguf_reader(tmp_path):
    pytest.importorskip("gguf")
    valid = _valid_gguf(tmp_path / "valid.gguf")
    cfg, _ = load_gguf(tmp_path / "valid.gguf")
    assert cfg.num_hidden_layers == 1
    outcomes = _run("fuzz.gguf", GGUF_ITERATIONS, _mutate_gguf, load_gguf, tmp_path, valid, seed=13)
    assert outcomes["CheckpointError"] > GGUF_ITERATIONS // 2
