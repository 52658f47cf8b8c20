"""Whole-checkpoint merge: `python -m hm3jax.merge` vs `mergekit-yaml` (mergekit 0.1.5), wall time and
peak RSS, on a synthetic Llama (default ~370M parameters, bfloat16) with a base and 3 fine-tunes.

Both tools run the same YAML recipe in a fresh subprocess each (so start-up, imports and compilation
count), on the same warm page cache (every input file is read once before timing). Peak RSS is the
child's ru_maxrss (memory-mapped pages that were touched count for both tools). The recipes compute in
float32 (`dtype: float32`) and write the input dtype. For ties the two outputs are compared.

    python benchmarks/merge_cli.py --workdir /tmp/merge-bench            # ~3 GB of checkpoints
    python benchmarks/merge_cli.py --workdir /tmp/merge-bench --methods ties --repeat 3
    python benchmarks/merge_cli.py --workdir /tmp/mb --hidden 128 --inter 256 --layers 2 --vocab 1000  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import yaml

from hm3jax.io.safetensors_io import CheckpointReader, to_numpy_dtype
from hm3jax.io.safetensors_writer import ShardedWriter
from hm3jax.models.config import ModelConfig
from hm3jax.models.params import hf_names, param_shapes

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": r.returncode, "wall_s": dt, "peak_rss": rss, "stderr": r.stderr[-2000:]}))
"""


def make_checkpoints(root: str, cfg: ModelConfig, dtype: str, n_ft: int = 3, seed: int = 0) -> dict[str, str]:
    """Write base + n_ft fine-tunes (base + small noise) tensor by tensor; reuse them if present."""
    names = ["base"] + [f"ft{i + 1}" for i in range(n_ft)]
    paths = {n: os.path.join(root, n) for n in names}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    np_dtype = to_numpy_dtype(dtype)
    shapes = param_shapes(cfg)
    specs = {}
    for name, (path, layer) in hf_names(cfg).items():
        shape = shapes[path][1:] if layer is not None else shapes[path]
        specs[name] = (shape, np_dtype)
    writers = {}
    for n, p in paths.items():
        os.makedirs(p, exist_ok=True)
        cfg.replace(torch_dtype=dtype).to_json_file(os.path.join(p, "config.json"))
        writers[n] = ShardedWriter(p, specs, max_shard_size="2GB")
    rng = np.random.default_rng(seed)
    for name, (shape, _) in specs.items():
        base = rng.standard_normal(shape, dtype=np.float32) * 0.02
        writers["base"].write(name, base.astype(np_dtype))
        for n in names[1:]:
            noise = rng.standard_normal(shape, dtype=np.float32) * 0.002
            writers[n].write(name, (base + noise).astype(np_dtype))
    for w in writers.values():
        w.close()
    return paths


def recipe(method: str, paths: dict[str, str], out_dtype: str) -> dict:
    fts = [k for k in paths if k != "base"]
    return {"merge_method": method, "base_model": paths["base"], "dtype": "float32", "out_dtype": out_dtype,
            "models": [{"model": paths[k], "parameters": {"weight": 1.0 / len(fts), "density": 0.5}}
                       for k in fts]}


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['stderr']}")
    return res


def warm_cache(paths) -> None:
    for p in paths.values():
        for f in os.listdir(p):
            with open(os.path.join(p, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def max_diff(a: str, b: str) -> float:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    return max(float(np.max(np.abs(ra.get(n).astype(np.float32) - rb.get(n).astype(np.float32))))
               for n in ra.names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="where checkpoints and outputs go (reused if present)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--methods", default="ties,dare_ties")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method (median reported)")
    args = ap.parse_args()

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=2048)
    n_params = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    paths = make_checkpoints(os.path.join(args.workdir, "models"), cfg, args.dtype)
    warm_cache(paths)
    print(f"synthetic llama: {n_params / 1e6:.0f}M params, {args.dtype}, base + {len(paths) - 1} fine-tunes")
    print(f"{'method':>10} {'tool':>9} {'wall s':>8} {'peak RSS GB':>12}")
    for method in args.methods.split(","):
        cfg_path = os.path.join(args.workdir, f"{method}.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(recipe(method, paths, args.dtype), f)
        outs = {t: os.path.join(args.workdir, f"out-{method}-{t}") for t in ("hm3jax", "mergekit")}
        cmds = {
            "hm3jax": [sys.executable, "-m", "hm3jax.merge", cfg_path, outs["hm3jax"], "--overwrite", "--quiet",
                       "--no-copy-tokenizer"],
            "mergekit": [sys.executable, "-m", "mergekit.scripts.run_yaml", cfg_path, outs["mergekit"],
                         "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"],
        }
        stats = {}
        for tool, cmd in cmds.items():
            runs = []
            for _ in range(args.repeat):
                if tool == "mergekit" and os.path.isdir(outs[tool]):
                    subprocess.run(["rm", "-rf", outs[tool]], check=True)
                runs.append(measure(cmd))
            wall = statistics.median(r["wall_s"] for r in runs)
            rss = max(r["peak_rss"] for r in runs)
            stats[tool] = (wall, rss)
            print(f"{method:>10} {tool:>9} {wall:8.1f} {rss / 1e9:12.2f}")
        speed = stats["mergekit"][0] / stats["hm3jax"][0]
        mem = stats["hm3jax"][1] / stats["mergekit"][1]
        # With 16-bit inputs many task-vector entries tie at the k-th magnitude; mergekit keeps an
        # unspecified subset of them (torch.argsort is not stable), hm3jax the lowest indices.
        note = f"  max |diff| {max_diff(outs['hm3jax'], outs['mergekit']):.3g}" if method == "ties" else ""
        print(f"{method:>10}  hm3jax is {speed:.2f}x mergekit's speed, {mem:.2f}x its peak RSS{note}")


if __name__ == "__main__":
    main()
