"""Parameter-space merging: pure JAX merge methods over parameter pytrees, mergekit YAML recipes,
and out-of-core merging of checkpoints on disk (`python -m hm3jax.merge CONFIG.yml OUT_DIR`).

Each method is a `MergeMethod`; `METHODS[name].merge(base, models, weights, key=..., **params)` merges
whole pytrees, and the module-level functions (`merging.ties(...)`, ...; api.py, api_other.py) call it
with each method's parameters spelled out (`help(merging.ties)`).
`merge_recipe(yaml_path, out_dir)` runs a mergekit recipe out of core (what the CLI does).
"""

from hm3jax.merging.api import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    task_arithmetic,
    ties,
)
from hm3jax.merging.api_other import (
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
    slerp,
)
from hm3jax.merging.averaging import stack_layers
from hm3jax.merging.base import REQUIRED, MergeMethod, Param, tensor_key
from hm3jax.merging.card import hub_id, model_card, write_model_card
from hm3jax.merging.methods import METHODS, UnknownMethodError, get_method, register
from hm3jax.merging.recipe import IgnoredKeyWarning, Recipe, RecipeError, load_recipe
from hm3jax.merging.sharded import merge_sharded
from hm3jax.merging.sparsify import (
    della_drop,
    della_probs,
    keep_count,
    magnitude,
    magnitude_outliers,
    random_drop,
    rescale_masked,
    topk_mask,
    uniform_hash,
)


def merge_recipe(recipe, out_dir, **kwargs):
    """Run a mergekit YAML recipe from disk to disk (see hm3jax.merging.stream.merge_recipe)."""
    # the streaming CLI's machinery loads where used: `import hm3jax.merging` stays light
    from hm3jax.merging.stream import merge_recipe as run

    return run(recipe, out_dir, **kwargs)

__all__ = [
    "METHODS",
    "REQUIRED",
    "IgnoredKeyWarning",
    "MergeMethod",
    "Param",
    "Recipe",
    "RecipeError",
    "UnknownMethodError",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_drop",
    "della_linear",
    "della_probs",
    "get_method",
    "hub_id",
    "karcher",
    "keep_count",
    "linear",
    "load_recipe",
    "magnitude",
    "magnitude_outliers",
    "merge_recipe",
    "merge_sharded",
    "model_card",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "random_drop",
    "register",
    "rescale_masked",
    "sce",
    "slerp",
    "stack_layers",
    "task_arithmetic",
    "tensor_key",
    "ties",
    "topk_mask",
    "uniform_hash",
    "write_model_card",
]
