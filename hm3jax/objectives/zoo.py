"""The embedded model zoo: a tiny Llama base and one expert per task, saved as HF checkpoints.

    python -m hm3jax.objectives.zoo OUT_DIR [--config small|default] [--seed N] [--force]

Layout of OUT_DIR (the contract other stages read):
    base/          the shared base model
    math/ code/ translation/    one expert per task, fine-tuned from base on that task only
    zoo.json       manifest: config, seed, heldout exact match per model per task, timings

The base is trained briefly and gently on the mixture of the three tasks' "train" splits (loss on
every token), so it knows the prompt and answer format but solves almost nothing. Each expert is
then fine-tuned from the base on its own task only (loss on answer + EOS), so the experts share a
base, each is strong on one task and weak on the others: merging them is a real trade-off. (A longer
or hotter base run makes the experts learn markedly slower, hence the short, low-rate base.)
Every model directory is written atomically and the manifest last, so a directory with a
zoo.json is complete; a second build with the same config and seed reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np

from hm3jax.io.atomic import write_json_atomic
from hm3jax.models.config import ModelConfig
from hm3jax.models.decoder import init_params
from hm3jax.objectives.batch import Batch, make_batch, make_suite_batch
from hm3jax.objectives.synthetic import TASK_NAMES, Task
from hm3jax.objectives.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer, save_tokenizer
from hm3jax.objectives.train_lm import OptimConfig, evaluate_exact_match, fit, whole_sequence_targets

MANIFEST = "zoo.json"
BASE = "base"
MODEL_NAMES = (BASE,) + TASK_NAMES
_FORMAT = 1
# Below this many expert steps in all, worker start-up costs more than parallel training saves.
_PARALLEL_MIN_STEPS = 2000


class ZooError(RuntimeError):
    """A zoo directory that cannot be used as asked (missing, incomplete, or built differently)."""


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Every hyperparameter of a zoo build (static; recorded in zoo.json).

    Attributes:
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        tie_word_embeddings: the Llama architecture (vocab = the char tokenizer's VOCAB_SIZE).
      task_seed: seed of the task suite. Kept apart from the build seed so zoos built with any seed
        are scored on, and never trained on, the same "search"/"heldout" examples.
      n_eval: examples per task in the evaluation splits ("search" + "heldout").
      n_train: "train" examples per task, in TASK_NAMES order. Code gets the most: its example
        space is large, and with few examples its expert memorises instead of generalising.
      base_steps, base_batch_size, base_learning_rate: base training on the task mixture (loss on
        every token); short and gentle, see the module docstring.
      expert_steps: fine-tuning steps per task, in TASK_NAMES order.
      expert_batch_size, expert_learning_rate: expert fine-tuning (loss on answer + EOS only).
      warmup_steps, weight_decay, grad_clip: AdamW settings shared by all runs.
      chunk_steps: steps per jitted chunk (one progress-bar update); divides every step count.
      seq_len: padded length of every training set (one compiled train step for all runs); None
        pads each set to its longest row rounded up to 4 (math rows are half as long as the
        others, which halves the cost of a math step for one extra compilation).
      min_expert_exact_match, max_base_exact_match: the targets this config is meant to reach,
        checked and reported (not enforced) after the build.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    tie_word_embeddings: bool = False
    task_seed: int = 0
    n_eval: int = 1000
    n_train: tuple[int, ...] = (8000, 20000, 5000)
    base_steps: int = 100
    base_batch_size: int = 64
    base_learning_rate: float = 1e-3
    expert_steps: tuple[int, ...] = (3000, 5000, 300)
    expert_batch_size: int = 32
    expert_learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chunk_steps: int = 50
    seq_len: int | None = None
    min_expert_exact_match: float = 0.9
    max_base_exact_match: float = 0.5

    def __post_init__(self):
        for name in ("expert_steps", "n_train"):
            value = getattr(self, name)
            if isinstance(value, list):  # read back from JSON
                object.__setattr__(self, name, value := tuple(value))
            if not isinstance(value, tuple) or len(value) != len(TASK_NAMES):
                raise ValueError(f"ZooConfig.{name} needs one count per task {TASK_NAMES}; got {value!r}")
        for name, steps in [("base_steps", self.base_steps)] + [
                (f"expert_steps[{t}]", s) for t, s in zip(TASK_NAMES, self.expert_steps)]:
            if steps <= self.warmup_steps or steps % self.chunk_steps:
                raise ValueError(f"ZooConfig.{name}={steps}: must exceed warmup_steps="
                                 f"{self.warmup_steps} and be a multiple of chunk_steps={self.chunk_steps}")

    def model_config(self) -> ModelConfig:
        """The architecture of every model in the zoo."""
        return ModelConfig(
            model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, torch_dtype="float32")

    def training_set(self, examples: Sequence[tuple[str, str]], tokenizer, task_ids) -> Batch:
        """Tokenized, padded training rows (length `seq_len`, or the longest rounded up to 4)."""
        return make_batch(examples, tokenizer, seq_len=self.seq_len, pad_multiple=4, task_ids=task_ids)

    def optim_config(self) -> OptimConfig:
        return OptimConfig(weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def suite(self) -> tuple[Task, ...]:
        """The task suite; its "search" and "heldout" splits are those of `tasks(task_seed, n_eval)`."""
        return tuple(Task(name, seed=self.task_seed, n_eval=self.n_eval, n_train=n)
                     for name, n in zip(TASK_NAMES, self.n_train))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZooConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ZooConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# A fast variant for tests: smaller and shorter, with targets it reaches with margin.
SMALL = ZooConfig(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
    n_train=(2000, 4000, 2000), base_steps=50, expert_steps=(600, 400, 200), expert_learning_rate=1e-2,
    warmup_steps=20, chunk_steps=50, seq_len=32, min_expert_exact_match=0.05, max_base_exact_match=0.05)
CONFIGS = {"small": SMALL, "default": ZooConfig()}


# ------------------------------------------------------------------------------------------ data
def base_training_set(zc: ZooConfig, tokenizer) -> Batch:
    """Every task's "train" examples as one Batch, every token after BOS a target."""
    rows: list[tuple[str, str]] = []
    ids: list[int] = []
    for k, task in enumerate(zc.suite()):
        ex = task.examples("train")
        rows += ex
        ids += [k] * len(ex)
    return whole_sequence_targets(zc.training_set(rows, tokenizer, ids))


# -------------------------------------------------------------------------------------- training
def _keys(seed: int) -> dict[str, jax.Array]:
    k_init, k_base, k_experts = jax.random.split(jax.random.key(seed), 3)
    keys = {"init": k_init, BASE: k_base}
    keys.update({name: jax.random.fold_in(k_experts, k) for k, name in enumerate(TASK_NAMES)})
    return keys


def train_base(zc: ZooConfig, seed: int, progress: bool = True) -> tuple[dict, dict]:
    """Train the base from scratch on the task mixture; return (params, stats)."""
    cfg, keys = zc.model_config(), _keys(seed)
    data = base_training_set(zc, build_tokenizer())
    return fit(cfg, zc.optim_config(), init_params(cfg, keys["init"]), data, keys[BASE],
               steps=zc.base_steps, batch_size=zc.base_batch_size, learning_rate=zc.base_learning_rate,
               warmup_steps=zc.warmup_steps, chunk_steps=zc.chunk_steps, desc=BASE, progress=progress)


def train_expert(zc: ZooConfig, seed: int, task_index: int, base: dict, progress: bool = True,
                 position: int = 0) -> tuple[dict, dict]:
    """Fine-tune `base` on task TASK_NAMES[task_index] (answer + EOS loss); return (params, stats)."""
    task = zc.suite()[task_index]
    data = zc.training_set(task.examples("train"), build_tokenizer(), task_index)
    return fit(zc.model_config(), zc.optim_config(), base, data, _keys(seed)[task.name],
               steps=zc.expert_steps[task_index], batch_size=zc.expert_batch_size,
               learning_rate=zc.expert_learning_rate, warmup_steps=zc.warmup_steps,
               chunk_steps=zc.chunk_steps, desc=task.name, position=position, progress=progress)


def _expert_job(config: dict, seed: int, task_index: int, base: dict, progress: bool, position: int):
    # Runs in a worker process: plain dicts and numpy arrays cross the process boundary.
    params, stats = train_expert(ZooConfig.from_dict(config), seed, task_index, base, progress, position)
    return jax.tree.map(np.asarray, params), stats


def train_zoo(zc: ZooConfig, seed: int, progress: bool = True,
              workers: int | None = None) -> tuple[ModelConfig, dict[str, dict], dict]:
    """Train the base, then the experts (in worker processes, one per core), in memory.

    Args:
      zc, seed: as in build_zoo.
      progress: show progress bars.
      workers: processes for the expert runs; 0 trains them one after the other in this process
        (sharing its compiled train step); None picks one per CPU core (at most one per task)
        when the runs are long enough to repay each worker's start-up and compilation (about
        10-20 s), else 0. The result does not depend on it.

    Returns:
      (model config, {"base" | task name: params}, {name: stats}) with stats the final training
      loss, wall and CPU seconds of each model.
    """
    base, base_stats = train_base(zc, seed, progress)
    models, stats = {BASE: base}, {BASE: base_stats}
    # Longest run first, so it never waits behind a short one.
    order = sorted(range(len(TASK_NAMES)), key=lambda k: -zc.expert_steps[k])
    if workers is None:
        long_runs = sum(zc.expert_steps) >= _PARALLEL_MIN_STEPS
        workers = min(len(TASK_NAMES), os.cpu_count() or 1) if long_runs else 0
    results = {}
    if workers == 0:
        for k in order:
            results[k] = train_expert(zc, seed, k, base, progress)
    else:
        import concurrent.futures
        import multiprocessing

        base_np = jax.tree.map(np.asarray, base)
        # "spawn": a forked child of a process that has started JAX's thread pools can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {k: pool.submit(_expert_job, zc.to_dict(), seed, k, base_np, progress, pos)
                       for pos, k in enumerate(order)}
            results = {k: f.result() for k, f in futures.items()}
    for k, name in enumerate(TASK_NAMES):
        models[name], stats[name] = results[k]
    return zc.model_config(), models, stats


def heldout_exact_match(cfg: ModelConfig, models: dict[str, dict], suite: Sequence[Task],
                        tokenizer) -> dict[str, dict[str, float]]:
    """{model name: {task name: teacher-forced exact match on the task's "heldout" split}}."""
    batch = make_suite_batch(suite, "heldout", tokenizer)
    return {name: dict(zip((t.name for t in suite),
                           map(float, evaluate_exact_match(cfg, params, batch, len(suite)))))
            for name, params in models.items()}


def format_table(manifest: dict) -> str:
    """The heldout exact-match table of a manifest: rows base + experts, columns tasks."""
    scores = manifest["heldout_exact_match"]
    names = list(manifest["tasks"])
    width = max(map(len, list(scores) + ["model"]))
    lines = ["heldout exact match (teacher-forced)",
             f"{'model':<{width}}  " + "  ".join(f"{n:>11}" for n in names)]
    for model, row in scores.items():
        lines.append(f"{model:<{width}}  " + "  ".join(f"{row[n]:>11.3f}" for n in names))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- disk (edges)
def _read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ZooError(f"{path}: not valid JSON ({e}); rebuild with force=True / --force") from None


def _is_complete(out_dir: str, manifest: dict) -> bool:
    return all(os.path.isfile(os.path.join(out_dir, name, "config.json")) for name in manifest["models"])


def build_zoo(out_dir: str | os.PathLike, config: ZooConfig = ZooConfig(), seed: int = 0,
              force: bool = False, progress: bool = True, workers: int | None = None) -> dict:
    """Train and save the zoo into `out_dir`, or reuse the one already there.

    Args:
      out_dir: target directory (created if missing).
      config: hyperparameters; SMALL is the fast test variant.
      seed: seed of parameter init and batch sampling (the task suite has its own, config.task_seed).
      force: rebuild even if `out_dir` holds a complete zoo of this config and seed.
      progress: show tqdm progress bars.
      workers: processes for the expert runs (see train_zoo); does not change the result.

    Returns:
      The manifest written to `out_dir/zoo.json`: format, config, seed, tasks, models (name ->
      subdirectory), heldout_exact_match ({model: {task: float}}), train (per-model final loss and
      seconds), build_seconds, targets_met.

    Raises:
      ZooError: `out_dir` holds a zoo of another config or seed and `force` is False.
    """
    from hm3jax.io import save_pretrained

    out_dir = os.path.abspath(os.fspath(out_dir))
    old = _read_manifest(out_dir)
    if old is not None and not force:
        if old.get("format") == _FORMAT and old.get("config") == config.to_dict() and old.get("seed") == seed:
            if _is_complete(out_dir, old):
                return old
        else:
            raise ZooError(f"{out_dir} holds a zoo built with another config or seed (manifest "
                           f"{os.path.join(out_dir, MANIFEST)}); pass force=True (--force) to replace it")
    os.makedirs(out_dir, exist_ok=True)
    if old is not None:
        # Drop the manifest before touching any model, so an interrupted rebuild never looks complete.
        os.remove(os.path.join(out_dir, MANIFEST))

    start = time.perf_counter()
    cfg, models, stats = train_zoo(config, seed, progress=progress, workers=workers)
    tokenizer = build_tokenizer()
    scores = heldout_exact_match(cfg, models, config.suite(), tokenizer)
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tokenizer(tok_dir)
        for name, params in models.items():
            save_pretrained(os.path.join(out_dir, name), cfg, params, tokenizer_from=tok_dir, overwrite=True)
    manifest = {
        "format": _FORMAT,
        "config": config.to_dict(),
        "seed": seed,
        "tasks": list(TASK_NAMES),
        "models": {name: name for name in models},
        "heldout_exact_match": scores,
        "train": stats,
        "build_seconds": time.perf_counter() - start,
        "targets_met": targets_met(scores, config),
        "versions": {"jax": jax.__version__},
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def targets_met(scores: dict[str, dict[str, float]], config: ZooConfig) -> bool:
    """Each expert >= min_expert_exact_match on its task and best there; base < max_base_exact_match."""
    base_ok = all(v < config.max_base_exact_match for v in scores[BASE].values())
    experts_ok = all(
        scores[t][t] >= config.min_expert_exact_match
        and all(scores[t][t] > scores[o][t] for o in scores if o != t)
        for t in TASK_NAMES)
    return base_ok and experts_ok


def load_zoo(out_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, dict], Any]:
    """Load a built zoo.

    Returns:
      (ModelConfig shared by all models, {"base" | task name: params pytree}, the tokenizer as
      transformers loads it from the base directory).

    Raises:
      ZooError: no complete zoo in `out_dir`, or models disagree on the architecture.
    """
    from hm3jax.io import load_pretrained, load_tokenizer

    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise ZooError(f"{out_dir}: no {MANIFEST}, so no complete zoo; build one with "
                       f"build_zoo({out_dir!r}) or `python -m hm3jax.objectives.zoo {out_dir}`")
    if not _is_complete(out_dir, manifest):
        raise ZooError(f"{out_dir}: {MANIFEST} lists models {list(manifest['models'])} but some "
                       "directories are missing; rebuild with --force")
    cfg, models = None, {}
    for name, sub in manifest["models"].items():
        c, models[name] = load_pretrained(os.path.join(out_dir, sub))
        if cfg is not None and c != cfg:
            raise ZooError(f"{out_dir}: model {name!r} has config {c} but {BASE!r} has {cfg}")
        cfg = c
    return cfg, models, load_tokenizer(os.path.join(out_dir, manifest["models"][BASE]))


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hm3jax.objectives.zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory for base/, one directory per task expert and zoo.json")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="default", help="hyperparameter set")
    ap.add_argument("--seed", type=int, default=0, help="seed of init and batch sampling")
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching zoo exists")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes for the expert runs (default: one per core; 0: in this process)")
    args = ap.parse_args(argv)
    try:
        manifest = build_zoo(args.out_dir, CONFIGS[args.config], seed=args.seed, force=args.force,
                             workers=args.workers)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(manifest))
    print(f"build time {manifest['build_seconds']:.1f}s (as recorded when built); "
          f"targets {'met' if manifest['targets_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    from hm3jax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # restarts once with huge-page malloc (see hm3jax.runtime)
    sys.exit(main())
