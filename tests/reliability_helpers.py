"""Small checkpoints written directly (no torch), file-tree hashing, a FIFO watchdog and the solution
records / one-line error checks shared by the reliability tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading

import numpy as np

from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.models import ModelConfig


def llama_config(layers: int = 2, hidden: int = 16, inter: int = 32, vocab: int = 32, **over) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 2,
           "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}
    cfg.update(over)
    return cfg


def llama_tensors(cfg: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return {k: rng.standard_normal(s).astype(np.float32).astype(dtype) for k, s in shapes.items()}


def write_model(path, cfg: dict | None = None, tensors: dict | None = None, seed: int = 0,
                max_shard_size: int | str = "5GB", tokenizer: bool = True) -> str:
    """An HF-style llama directory: config.json, safetensors, stand-in tokenizer files."""
    path = os.fspath(path)
    cfg = cfg or llama_config()
    tensors = tensors if tensors is not None else llama_tensors(cfg, seed)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with ShardedWriter(path, {k: (a.shape, a.dtype) for k, a in tensors.items()},
                       max_shard_size=max_shard_size) as w:
        for k, a in tensors.items():
            w.write(k, a)
    if tokenizer:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 64}, f)
    return path


def tree_hashes(root) -> dict[str, str]:
    """{relative path: sha256 (files), '->target' (links), 'dir' or 'special <mode>' (FIFOs, sockets)} of everything under root."""
    root = os.fspath(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = "->" + os.readlink(p) if os.path.islink(p) else "dir"
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "->" + os.readlink(p)
            elif not stat.S_ISREG(os.lstat(p).st_mode):  # a FIFO or socket: never opened (it would block)
                out[os.path.relpath(p, root)] = f"special {stat.S_IFMT(os.lstat(p).st_mode):o}"
            else:
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


TASKS = ["math", "code", "translation"]
CFG = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    for w in words:
        assert re.search(w, lines[0]), (w, lines[0])
    return lines[0]


def solution(pref=(0.2, 0.5, 0.3), path=(("merge", 0), ("code", 2), ("merge", 2)), shell="merge",
             scores=(0.7, 0.7, 0.7), **upper):
    up = {"method": "task_arithmetic", "density": 1.0, "scale": 0.8, "seed": 5,
          "key_data": [0, 5], **upper}
    return {"preference": list(pref), "upper": up, "path": [list(s) for s in path], "shell": shell,
            "scores": {"search": list(scores), "heldout": list(scores)},
            "cost": {"layers": len(path), "parameters": 1, "flops_per_token": 1.0}, "dominated": False}


def write_front(run, solutions, ideal=(1.0, 1.0, 1.0), tasks=TASKS):
    doc = {"tasks": list(tasks), "ideal": list(ideal) if isinstance(ideal, tuple) else ideal, "solutions": solutions}
    (run / "front.json").write_text(json.dumps(doc))  # NaN / Infinity written on purpose


class FifoWatchdog:
    """Opens the given FIFOs for writing after `seconds`, so a reader stuck in open() returns and the
    test fails on `fired` instead of hanging the suite (the CLIs install signal handlers, so they
    must run in the main thread)."""

    def __init__(self, *fifos, seconds: float = 20):
        self.fifos, self.fired = fifos, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)

    def _run(self, seconds):
        if self._stop.wait(seconds):
            return
        self.fired = True
        for f in self.fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
