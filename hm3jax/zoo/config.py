"""ZooConfig: every hyperparameter of a zoo build, with the targets the build is checked against."""

from __future__ import annotations

import dataclasses
from typing import Any

from hm3jax.models.config import ModelConfig
from hm3jax.objectives.synthetic import TASK_NAMES, Task
from hm3jax.objectives.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from hm3jax.zoo.train import OptimConfig

# Fields holding one value per task, in TASK_NAMES order.
_PER_TASK = ("n_train", "base_mixture", "base_hard_rows", "base_hard_near_miss", "base_prompt_loss",
             "expert_steps")


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    """Every hyperparameter of a zoo build (static; recorded in zoo.json).

    The base is "pretrained" on a mixture of the three tasks (loss on every token, or on the
    answers only for math) until it has partial skill; each expert is then a gentle fine-tune of
    it on one task (low learning rate, loss on the answer and EOS only), so the experts stay close
    to the base and their task vectors combine under parameter-level merging.

    Attributes:
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        tie_word_embeddings: the Llama architecture (vocab = the char tokenizer's VOCAB_SIZE).
      task_seed: seed of the task suite. Kept apart from the build seed so zoos built with any seed
        are scored on, and never trained on, the same "search"/"heldout" examples.
      n_eval: examples per task in the evaluation splits ("search" + "heldout").
      n_train: "train" examples per task, in TASK_NAMES order (the experts' fine-tuning sets).
      base_mixture: rows of each task's "train" split in the base's mixture, in TASK_NAMES order
        (the first rows of the split; <= n_train). The base's skill per task follows its share:
        translation is learnt from far fewer rows than math, so it gets far fewer.
      base_easy_only: the base's rows come from the easy half of each task only (see
        hm3jax.objectives.synthetic.is_hard), so its skill stops at about that half whatever the
        training length, and each expert adds its task's hard half.
      base_hard_rows: rows of each task's hard half added to the base's mixture (a glimpse of the
        hard half, so the experts' moves from the base are smaller).
      base_hard_near_miss: share of those hard rows, per task, whose answer is a systematic near
        miss (hm3jax.zoo.data.near_miss: last two words swapped, or last digit off by one). With a
        share above one half the base learns the hard half's computation but prefers the wrong
        answer, like a pretrained model with a known bias; an expert's clean fine-tune only has to
        tip that preference, a small move that still tips it when a merge scales it down. The
        default gives every task such rows: math 3400 (60% near misses), code 1500 (75%),
        translation 200 (60%). Math's three-digit half is learnt late (a sharp transition, near
        1200 steps at the default settings; benchmarks/README.md), so the base needs its answer-only
        math loss, 1200 steps and the higher learning rate to hold that computation.
      base_prompt_loss: per task, whether the base's loss on its rows covers every token after BOS
        (the prompt's language as well as the answer) or the answer and EOS only. Math's prompts are
        two uniformly random numbers: their tokens hold nothing to learn, and their loss is noise
        that slows the base's learning of the sums (easy math 70% -> 91% at 1000 steps when it is
        left out), so the default leaves it out for math.
      base_steps, base_batch_size, base_learning_rate: base training on the mixture. The base
        must pass the three-digit math transition (hold the computation, prefer the near miss), or
        the math expert learns it from scratch and its task vector does not survive merging; when
        that happens depends on the CPU's rounding: 1400 steps passed it on one CPU and not on
        another, 2000 pass it there (benchmarks/README.md, zoo build, sixth round).
      expert_steps: fine-tuning steps per task, in TASK_NAMES order.
      expert_batch_size, expert_learning_rate: expert fine-tuning (answer + EOS loss only).
      expert_replay: rows of each other task's base mixture mixed into an expert's fine-tuning set
        (loss on every token), evenly spaced over the mixture so its hard rows are replayed too
        (hm3jax.zoo.data.replay_rows); this anchors the expert near the base on those tasks.
      expert_replay_spread: replay rows evenly spaced over each mixture (its hard rows in
        proportion), or its first rows (all easy: the base's skill on the hard rows is then not
        anchored, and the other experts forget it; the small test config, whose mixtures have no
        hard rows, keeps the first rows).
      warmup_steps, weight_decay, grad_clip: AdamW settings shared by all runs.
      chunk_steps: steps per jitted chunk (one progress-bar update); divides every step count.
      seq_len: padded length of every training set (one compiled train step for all runs); None
        pads each set to its longest row rounded up to 4.
      probe_density, probe_scale: settings of the parameter-level merges in the mergeability probe
        (those of hm3jax.search.upper's defaults: DARE/TIES density and the task-vector scale).
      probe_lean: weight of the favoured task in the probe's task-leaning preferences (the others
        share the rest equally).
      min_expert_exact_match: each expert's held-out exact match on its own task must reach this.
      min_off_task_gap: each expert must be at least this much weaker on every other task (a
        negative value relaxes it, as the small test config does).
      max_base_exact_match: the base must stay at or below this on every task.
      merge_tolerance: how far below the base a centre merge may be on a task and still count as
        above it (0: strictly above).
      min_merge_exact_match: the best centre-preference merge must reach this on every task (and
        beat the base on every task).
      min_swap_exact_match: an expert with one middle layer swapped for another expert's or the
        centre merge's must keep this on its own task.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    tie_word_embeddings: bool = False
    task_seed: int = 0
    n_eval: int = 1000
    n_train: tuple[int, ...] = (8000, 8000, 4000)
    base_mixture: tuple[int, ...] = (3400, 3000, 390)
    base_easy_only: bool = True
    base_hard_rows: tuple[int, ...] = (3400, 1500, 200)
    base_hard_near_miss: tuple[float, ...] = (0.75, 0.75, 0.6)
    base_prompt_loss: tuple[bool, ...] = (False, True, True)
    base_steps: int = 2000
    base_batch_size: int = 128
    base_learning_rate: float = 3e-3
    expert_steps: tuple[int, ...] = (1000, 1000, 500)
    expert_batch_size: int = 32
    expert_learning_rate: float = 1e-3
    expert_replay: int = 1000
    expert_replay_spread: bool = True
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chunk_steps: int = 50
    seq_len: int | None = None
    probe_density: float = 0.7
    probe_scale: float = 1.0
    probe_lean: float = 0.6
    min_expert_exact_match: float = 0.9
    min_off_task_gap: float = 0.3
    max_base_exact_match: float = 0.6
    min_merge_exact_match: float = 0.5
    merge_tolerance: float = 0.0
    min_swap_exact_match: float = 0.5

    def __post_init__(self):
        for name in _PER_TASK:
            value = getattr(self, name)
            if isinstance(value, list):  # read back from JSON or YAML
                object.__setattr__(self, name, value := tuple(value))
            if not isinstance(value, tuple) or len(value) != len(TASK_NAMES):
                raise ValueError(f"ZooConfig.{name} needs one count per task {TASK_NAMES}; got {value!r}")
        for t, m, n in zip(TASK_NAMES, self.base_mixture, self.n_train):
            if not 0 <= m <= n:
                raise ValueError(f"ZooConfig.base_mixture[{t}]={m}: must be in [0, n_train[{t}]={n}]")
        for t, b in zip(TASK_NAMES, self.base_prompt_loss):
            if not isinstance(b, bool):
                raise ValueError(f"ZooConfig.base_prompt_loss[{t}]={b!r}: must be true or false")
        for t, q in zip(TASK_NAMES, self.base_hard_near_miss):
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"ZooConfig.base_hard_near_miss[{t}]={q}: must be in [0, 1]")
        if not isinstance(self.expert_replay_spread, bool):
            raise ValueError(f"ZooConfig.expert_replay_spread={self.expert_replay_spread!r}: "
                             "must be true or false")
        if self.expert_replay < 0:
            raise ValueError(f"ZooConfig.expert_replay={self.expert_replay}: must be >= 0")
        if sum(self.base_mixture) == 0:
            raise ValueError("ZooConfig.base_mixture: the base needs at least one training row")
        for name, steps in [("base_steps", self.base_steps)] + [
                (f"expert_steps[{t}]", s) for t, s in zip(TASK_NAMES, self.expert_steps)]:
            if steps <= self.warmup_steps or steps % self.chunk_steps:
                raise ValueError(f"ZooConfig.{name}={steps}: must exceed warmup_steps="
                                 f"{self.warmup_steps} and be a multiple of chunk_steps={self.chunk_steps}")
        if self.num_hidden_layers < 3:
            raise ValueError(f"ZooConfig.num_hidden_layers={self.num_hidden_layers}: the layer-swap "
                             "probe needs a middle layer, so at least 3")
        if not 0.0 < self.probe_density <= 1.0:
            raise ValueError(f"ZooConfig.probe_density={self.probe_density}: must be in (0, 1]")
        if not 1.0 / len(TASK_NAMES) < self.probe_lean < 1.0:
            raise ValueError(f"ZooConfig.probe_lean={self.probe_lean}: must be in "
                             f"(1/{len(TASK_NAMES)}, 1)")

    def model_config(self) -> ModelConfig:
        """The architecture of every model in the zoo."""
        return ModelConfig(
            model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, torch_dtype="float32")

    def optim_config(self) -> OptimConfig:
        return OptimConfig(weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def suite(self) -> tuple[Task, ...]:
        """The task suite; its "search" and "heldout" splits are those of `tasks(task_seed, n_eval)`."""
        return tuple(Task(name, seed=self.task_seed, n_eval=self.n_eval, n_train=n)
                     for name, n in zip(TASK_NAMES, self.n_train))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        if not isinstance(d, dict):
            raise ValueError(f"ZooConfig: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ZooConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# A fast variant for tests: narrower and shorter, with relaxed targets it reaches with margin.
SMALL = ZooConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=2, n_eval=600, n_train=(3000, 3000, 2000), base_mixture=(1200, 1200, 300),
    base_hard_rows=(0, 0, 0), base_hard_near_miss=(0.0, 0.0, 0.0), base_prompt_loss=(True, True, True),
    base_steps=400, base_learning_rate=3e-3, expert_steps=(400, 400, 200), expert_learning_rate=3e-3,
    expert_replay=400, expert_replay_spread=False, warmup_steps=20, chunk_steps=50, seq_len=32,
    min_expert_exact_match=0.05, min_off_task_gap=-1.0, max_base_exact_match=0.5, min_merge_exact_match=0.0, min_swap_exact_match=0.0,
    # its experts reach only a few percent on math, so a merge's math score is within a few of 180
    # held-out rows of the base's whichever way the CPU rounds: allow 2 points below the base there
    merge_tolerance=0.02)
DEFAULT = ZooConfig()
CONFIGS = {"small": SMALL, "default": DEFAULT}
