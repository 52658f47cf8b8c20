"""One short check of hm3jax on an accelerator (GPU or TPU; < 5 min): three numbers against the device.

1. forward tokens/s: `hm3jax.models.forward` vs transformers' PyTorch model, same random Llama
   weights, same dtype (bfloat16 on an accelerator), same batch (transformers on CUDA when torch
   sees a GPU, else skipped on TPU: no common device).
2. in-memory merge GB/s: task arithmetic and TIES (threshold-search trim) on device-resident
   params of base + 3 fine-tunes, bytes moved = (M + 2) x tree bytes, against the device's own
   copy bandwidth (a jitted `x + 0` over the same bytes: read + write).
3. paths scored per second: `make_path_scorer` vmapped over a batch of paths into a (K+1)·L pool.

    python benchmarks/device_check.py            # accelerator sizes (~0.5B model, 1 GB trees)
    python benchmarks/device_check.py --tiny     # seconds on CPU: the same code paths, tiny sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_inmemory import median_time

SIZES = {  # (hidden, inter, layers, heads, kv heads, vocab, batch, seq, merge GB, paths, rows)
    "full": (1024, 4096, 16, 16, 8, 32000, 8, 512, 1.0, 64, 16),
    "tiny": (64, 128, 2, 4, 2, 256, 2, 32, 0.004, 8, 4),
}


def check_forward(cfg, dtype, batch: int, seq: int, runs: int) -> dict:
    """tokens/s of our forward and transformers' on the same random checkpoint and dtype."""
    import torch
    import transformers

    from hm3jax.io import load_pretrained
    from hm3jax.models import forward

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")})
    tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    model = transformers.LlamaForCausalLM(hf_cfg).to(tdt).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        mcfg, params = load_pretrained(tmp, dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq))
    fwd = jax.jit(lambda p, x: forward(mcfg, p, x))
    jtok = jnp.asarray(tokens)
    ours = median_time(lambda: fwd(params, jtok), runs)
    out = {"ours_tok_s": batch * seq / ours}
    on_tpu = jax.devices()[0].platform == "tpu"
    dev = "cuda" if torch.cuda.is_available() else None if on_tpu else "cpu"
    if dev is not None:
        model = model.to(dev)
        ttok = torch.as_tensor(tokens, device=dev)

        def ref():
            with torch.inference_mode():
                model(ttok).logits.float()
            if dev == "cuda":
                torch.cuda.synchronize()

        ref()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            ref()
            times.append(time.perf_counter() - t)
        out["transformers_tok_s"] = batch * seq / statistics.median(times)
        out["transformers_device"] = dev
        a = np.asarray(fwd(params, jtok)[:, -1], np.float32)
        with torch.inference_mode():
            b = model(ttok).logits[:, -1].float().cpu().numpy()
        out["max_logit_diff"] = float(np.abs(a - b).max())
    return out


def check_merge(gb: float, hidden: int, inter: int, vocab: int, dtype, runs: int) -> dict:
    """GB/s of task arithmetic and TIES vs the device's copy bandwidth on the same bytes."""
    from merge_inmemory import llama_tree  # the Llama-shaped tree of the in-memory merge benchmark

    from hm3jax import merging

    key = jax.random.PRNGKey(0)
    base = jax.tree.map(lambda x: x.astype(dtype), llama_tree(key, gb, hidden, inter, vocab))
    models = [jax.tree.map(lambda b, i=i: b + (0.01 * jax.random.normal(jax.random.PRNGKey(i), b.shape)).astype(dtype),
                           base) for i in range(1, 4)]
    w = jnp.full((3,), 1 / 3)
    size = sum(x.nbytes for x in jax.tree.leaves(base))
    moved = 5 * size
    flat = jnp.zeros((moved // 2 // 4,), jnp.float32)  # read moved/2, write moved/2
    copy = jax.jit(lambda x: x + 0)
    t_copy = median_time(lambda: copy(flat), runs)
    out = {"tree_gb": size / 1e9, "copy_gb_s": moved / t_copy / 1e9}
    fns = {"task_arithmetic": jax.jit(lambda b, ms: merging.task_arithmetic(b, ms, w)),
           "ties": jax.jit(lambda b, ms: merging.ties(b, ms, w, density=0.5, trim="search"))}
    for name, f in fns.items():
        t = median_time(lambda f=f: f(base, models), runs)
        out[f"{name}_gb_s"] = moved / t / 1e9
        out[f"{name}_x_copy"] = t_copy / t
    return out


def check_paths(cfg, dtype, n_paths: int, rows: int, seq: int, runs: int) -> dict:
    """Paths scored per second: make_path_scorer vmapped over n_paths paths, pool of 4 models."""
    from hm3jax.models import init_params
    from hm3jax.models.pool import build_pool, shell_of
    from hm3jax.objectives.batch import Batch
    from hm3jax.objectives.scoring import make_path_scorer

    ms = [init_params(cfg, jax.random.PRNGKey(i), dtype=dtype) for i in range(4)]
    pool = build_pool(ms)
    rng = np.random.default_rng(0)
    batch = Batch(rng.integers(0, cfg.vocab_size, (rows, seq)).astype(np.int32), np.ones((rows, seq), np.int32),
                  np.ones((rows, seq), bool), np.zeros(rows, np.int32))
    score = jax.jit(jax.vmap(make_path_scorer(cfg, shell_of(ms[0]), pool, batch)))
    paths = jnp.asarray(rng.integers(0, pool.size, (n_paths, cfg.num_hidden_layers)), jnp.int32)
    t = median_time(lambda: score(paths), runs)
    return {"paths_per_s": n_paths / t, "tokens_per_s": n_paths * rows * seq / t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, float32: an end-to-end check on CPU")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from hm3jax.models.config import ModelConfig

    D, F, L, H, KV, V, B, S, gb, n_paths, rows = SIZES["tiny" if args.tiny else "full"]
    dtype = jnp.float32 if args.tiny or jax.devices()[0].platform == "cpu" else jnp.bfloat16
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, head_dim=D // H, tie_word_embeddings=False)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} x{len(jax.devices())}, jax {jax.__version__}, "
          f"dtype {jnp.dtype(dtype).name}")
    t0 = time.perf_counter()
    for name, fn in (("forward", lambda: check_forward(cfg, dtype, B, S, args.runs)),
                     ("merge", lambda: check_merge(gb, D * 2, F * 2, V, dtype, args.runs)),
                     ("paths", lambda: check_paths(cfg, dtype, n_paths, rows, S // 2, args.runs))):
        t = time.perf_counter()
        res = fn()
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        print(f"{name:8s} ({time.perf_counter() - t:.1f} s): {shown}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
