"""The embedded model zoo: a tiny Llama base "pretrained" on the task suite's mixture and one
gently fine-tuned expert per task, built on CPU in minutes, saved as HF checkpoints, and probed for
how well its experts merge (parameter-level merges and layer swaps).

    python -m hm3jax.zoo OUT_DIR [--config default|small] [--seed N] [--force]
"""

from hm3jax.zoo.build import (
    BASE,
    MANIFEST,
    MODEL_NAMES,
    ZooError,
    build_zoo,
    check_zoo_dir,
    load_zoo,
    read_manifest,
)
from hm3jax.zoo.config import CONFIGS, DEFAULT, SMALL, ZooConfig
from hm3jax.zoo.probe import format_report, probe_mergeability, targets

__all__ = [
    "BASE",
    "CONFIGS",
    "DEFAULT",
    "MANIFEST",
    "MODEL_NAMES",
    "SMALL",
    "ZooConfig",
    "ZooError",
    "build_zoo",
    "check_zoo_dir",
    "format_report",
    "load_zoo",
    "probe_mergeability",
    "read_manifest",
    "targets",
]
