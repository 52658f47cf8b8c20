"""HM3's two levels: parameter-space merges per preference (upper) and layer-path search (lower).

Lower level: `base` (the Searcher protocol every path search implements: init, chunk, best;
ChunkMetrics), `env` (the path MDP), `agent` (GRU actor-critic, categorical / Wolpertinger heads),
`ppo` (make_train, vmapped over preferences, bound from pure functions), `lower` (pool, model scorer,
run_lower), `hooks` (run_lower's checkpoint / log / progress hooks, ChunkInfo), `path_baselines`
(random and evolutionary path search at equal budgets).
"""

from hm3jax.search.agent import AgentConfig
from hm3jax.search.base import ChunkMetrics, Searcher, Trainer
from hm3jax.search.env import BestPaths, EnvConfig, PathLayout, PathProblem, Scorer
from hm3jax.search.lower import (
    ChunkInfo,
    LowerConfig,
    LowerResult,
    SearchData,
    build_search,
    checkpoint_hook,
    log_hook,
    make_lower_train,
    make_model_scorer,
    progress_hook,
    propose,
    run_lower,
)
from hm3jax.search.path_baselines import PathSearchConfig, make_path_search
from hm3jax.search.ppo import PPOConfig, make_train
from hm3jax.search.upper import (
    UpperConfig,
    UpperResult,
    merge_for_preference,
    run_upper,
    run_upper_many,
)

__all__ = [
    "AgentConfig", "BestPaths", "ChunkInfo", "ChunkMetrics", "EnvConfig", "LowerConfig", "LowerResult",
    "PPOConfig", "PathLayout", "PathProblem", "PathSearchConfig", "Scorer", "SearchData", "Searcher",
    "Trainer", "UpperConfig", "UpperResult", "build_search", "checkpoint_hook", "log_hook",
    "make_lower_train", "make_model_scorer", "make_path_search", "make_train", "merge_for_preference",
    "progress_hook", "propose", "run_lower", "run_upper", "run_upper_many",
]
