"""Scoring a batch of layer paths on a device mesh: the pool sharded over `fsdp` (FSDP over the hidden
dimension), the candidate paths (or the examples) split over `data`, one jit with explicit in/out
shardings. The numbers are those of `make_path_scorer` (vmapped over paths), up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hm3jax.models.decoder import forward_layers
from hm3jax.objectives.batch import Batch
from hm3jax.objectives.scoring import answer_loglik, exact_match, task_means
from hm3jax.sharding import batch_sharding, param_shardings, pool_shardings, replicated

SPLITS = ("paths", "examples")


def make_sharded_paths_scorer(cfg, shell: dict, pool, batch: Batch, mesh: Mesh, num_tasks: int | None = None,
                              split: str = "paths", mesh_cfg=None
                              ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """A scorer of a batch of paths on `mesh`.

    Args:
      cfg: ModelConfig of the pool (static). shell: embeddings / norm / head. pool: LayerPool.
      batch: the rows scored. num_tasks: None for overall means, K for per-task means.
      mesh: hm3jax.sharding mesh. The shell and pool are placed by the partition rules (moved onto
        the mesh once, here); the pool axis is never split, so a scan step slices its layer locally.
      split: "paths" (candidates over `data`, examples replicated; outputs split like the paths) or
        "examples" (rows over `data`, paths replicated; the per-task means are reduced across it).
      mesh_cfg: MeshConfig whose rule overrides apply.

    Returns:
      score_paths(paths int [N, T]) -> (exact_match, loglik), each [N] (or [N, num_tasks]) float32.
      N must be a multiple of the `data` axis size when split="paths", the row count when
      split="examples" (pad with `objectives.batch.pad_rows`).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    shell_sh = param_shardings(shell, mesh, mesh_cfg)
    layers_sh = pool_shardings(pool.layers, mesh, mesh_cfg)
    shell = jax.device_put(shell, shell_sh)
    layers = jax.device_put(pool.layers, layers_sh)
    rows = Batch(*(np.asarray(x) for x in batch))
    data = mesh.shape["data"]
    if split == "examples" and rows.tokens.shape[0] % data:
        raise ValueError(f"{rows.tokens.shape[0]} rows do not split over mesh axis data ({data} devices); "
                         "pad them with objectives.batch.pad_rows")
    if split == "examples":
        rows_sh = Batch(*(batch_sharding(mesh, x.ndim, "batch", mesh_cfg) for x in rows))
        paths_sh = out_sh = replicated(mesh)
    else:
        rows_sh = Batch(*(replicated(mesh) for _ in rows))
        paths_sh = batch_sharding(mesh, 2, "paths", mesh_cfg)
        out_sh = batch_sharding(mesh, 1 if num_tasks is None else 2, "paths", mesh_cfg)
    rows = jax.device_put(rows, rows_sh)

    def score_paths(shell, layers, rows, paths):
        def one(path):
            logits = forward_layers(cfg, shell, layers, path, rows.tokens, rows.attention_mask)
            return (task_means(exact_match(logits, rows), rows, num_tasks),
                    task_means(answer_loglik(logits, rows), rows, num_tasks))

        return jax.vmap(one)(paths)

    jitted = jax.jit(score_paths, in_shardings=(shell_sh, layers_sh, rows_sh, paths_sh),
                     out_shardings=(out_sh, out_sh))

    def score(paths):
        paths = jnp.asarray(paths, jnp.int32)
        if paths.ndim != 2:
            raise ValueError(f"paths must be int [N, T], got shape {tuple(paths.shape)}")
        pool.check_path(np.asarray(paths))
        if split == "paths" and paths.shape[0] % data:
            raise ValueError(f"{paths.shape[0]} paths do not split over mesh axis data ({data} devices); "
                             "pass a multiple of it")
        return jitted(shell, layers, rows, paths)

    score.lower = lambda paths: jitted.lower(shell, layers, rows, jnp.asarray(paths, jnp.int32))
    return score
