"""Host memory of loading + merging a synthetic checkpoint, sharded over 8 fake CPU devices vs not.

    python benchmarks/sharded_memory.py make DIR [--size 0.5b|tiny]   # base + one expert, bfloat16
    python benchmarks/sharded_memory.py run DIR sharded|unsharded     # one fresh process per mode

`run` loads base and expert (`load_sharded` over a 1 x 8 fsdp mesh, or `load_pretrained`), merges
them with task arithmetic (`merging.sharded.merge_sharded`, or the plain merge), and prints peak anonymous
resident memory (sampled every 5 ms; file pages of the memory-mapped shards are not counted), peak
RSS (ru_maxrss, file pages included), and the largest host buffer the loader allocated: one
device's slice (sharded) or one whole stacked leaf (unsharded: `params_from_source` fills an
[L, ...] array before handing it to JAX). On fake CPU devices every shard still lives in the same
host's memory, so peak totals are alike; the transient buffers are what sharding removes.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time

if len(sys.argv) > 3 and sys.argv[3] == "sharded":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hm3jax.models.config import ModelConfig
from hm3jax.models.params import param_shapes, set_path

SIZES = {  # Qwen2.5-0.5B's shapes (494M parameters), and a tiny one for a quick check
    "0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                        tie_word_embeddings=True),
    "tiny": ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        tie_word_embeddings=False),
}


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def make(out: str, size: str) -> None:
    from hm3jax.io import save_pretrained

    cfg = SIZES[size]
    rng = np.random.default_rng(0)
    for name, scale in (("base", 0.02), ("expert", 0.021)):
        params: dict = {}
        for p, shape in param_shapes(cfg).items():
            a = (rng.standard_normal(shape, np.float32) * scale).astype(ml_dtypes.bfloat16)
            set_path(params, p, a)
        save_pretrained(os.path.join(out, name), cfg, params, max_shard_size="500MB")
        del params


def run(root: str, mode: str) -> None:
    from hm3jax import merging
    from hm3jax.io import load_pretrained
    from hm3jax.io.sharded import load_sharded
    from hm3jax.merging.sharded import merge_sharded
    from hm3jax.sharding import MeshConfig, make_mesh, param_shardings

    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.005)

    start = _anon_kib()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    stats: dict = {}
    if mode == "sharded":
        mesh = make_mesh(MeshConfig(fsdp=-1))
        cfg, base = load_sharded(os.path.join(root, "base"), mesh, stats=stats)
        _, expert = load_sharded(os.path.join(root, "expert"), mesh, stats=stats)
        merged = merge_sharded("task_arithmetic", base, [expert], jnp.array([0.8]),
                               shardings=param_shardings(base, mesh))
        largest = stats["largest_host_buffer"]
    else:
        cfg, base = load_pretrained(os.path.join(root, "base"))
        _, expert = load_pretrained(os.path.join(root, "expert"))
        merged = merging.task_arithmetic(base, [expert], jnp.array([0.8]))
        largest = max(x.nbytes for x in jax.tree.leaves(base))
    jax.block_until_ready(merged)
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    model = sum(x.nbytes for x in jax.tree.leaves(base))
    tensor = max(int(np.prod(s[1:] if p[0] == "layers" else s)) for p, s in param_shapes(cfg).items()) * 2
    print(f"{mode}: {len(jax.devices())} device(s), model {model / 2**20:.0f} MiB, {secs:.1f} s; "
          f"peak anon RSS {(peak[0] - start) / 1024:.0f} MiB above start; ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; largest host buffer of the "
          f"loader {largest / 2**20:.1f} MiB (model/8 + one tensor = {(model / 8 + tensor) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--size" else "0.5b")
    else:
        run(sys.argv[2], sys.argv[3])
