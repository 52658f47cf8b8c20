"""HM3's two levels: parameter-space merges per preference (upper) and layer-path search (lower).

Lower level: `env` (the path MDP), `agent` (GRU actor-critic, categorical / Wolpertinger heads),
`ppo` (make_train, vmapped over preferences), `lower` (pool, model scorer, run_lower),
`path_baselines` (random and evolutionary path search at equal budgets).
"""

from hm3jax.search.agent import AgentConfig
from hm3jax.search.env import BestPaths, EnvConfig, PathLayout, PathProblem, Scorer
from hm3jax.search.lower import (
    LowerConfig,
    LowerResult,
    SearchData,
    build_search,
    make_lower_train,
    make_model_scorer,
    propose,
    run_lower,
)
from hm3jax.search.path_baselines import PathSearchConfig, make_path_search
from hm3jax.search.ppo import PPOConfig, Trainer, make_train
from hm3jax.search.upper import (
    UpperConfig,
    UpperResult,
    merge_for_preference,
    run_upper,
    run_upper_many,
)

__all__ = [
    "AgentConfig", "BestPaths", "EnvConfig", "LowerConfig", "LowerResult", "PPOConfig", "PathLayout",
    "PathProblem", "PathSearchConfig", "Scorer", "SearchData", "Trainer", "UpperConfig", "UpperResult",
    "build_search", "make_lower_train", "make_model_scorer", "make_path_search", "make_train",
    "merge_for_preference", "propose", "run_lower", "run_upper", "run_upper_many",
]
