"""Lower level on the embedded zoo (conftest.small_zoo): PPO agents learn, and the best path's
recorded scores are what a fresh forward pass of that path gives on the same split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.models import LayerPool
from hm3jax.objectives import TASK_NAMES, make_path_scorer, make_suite_batch
from hm3jax.search.agent import AgentConfig
from hm3jax.search.env import EnvConfig
from hm3jax.search.lower import (
    LowerConfig,
    build_search,
    make_lower_train,
    make_model_scorer,
    run_lower,
)
from hm3jax.search.ppo import PPOConfig
from hm3jax.search.upper import merge_for_preference

try:
    from hm3jax.zoo import BASE, SMALL
except ImportError:  # before the zoo package existed
    from hm3jax.zoo import BASE, SMALL

PREFS = np.asarray([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]], np.float32)
# loglik: the small zoo's merges have ~0 exact match, a flat reward; the answer log-likelihood is not
CFG = LowerConfig(env=EnvConfig(search_minibatch=48),
                  agent=AgentConfig(embed_dim=16, hidden_dim=32, mlp_dim=32),
                  ppo=PPOConfig(num_envs=16, minibatches=2, iterations=24, chunk_iterations=4, lr=3e-3,
                                critic_lr=3e-3),
                  objective="loglik")


@pytest.fixture(scope="module")
def zoo_run(small_zoo_loaded):
    cfg, models, tokenizer = small_zoo_loaded
    batch = make_suite_batch(SMALL.suite(), "search", tokenizer)
    experts = [models[t] for t in TASK_NAMES]
    merged = [merge_for_preference("task_arithmetic", models[BASE], experts, p, jax.random.key(0))
              for p in PREFS]
    data, problems, layout = build_search(cfg, experts, merged, batch, PREFS, np.zeros(3), CFG,
                                          base=models[BASE])
    trainer = make_lower_train(CFG, layout, make_model_scorer(cfg, len(TASK_NAMES), CFG))
    res = run_lower(trainer, layout, problems, data, jax.random.key(0), CFG.ppo.num_chunks)
    return cfg, batch, data, res


@pytest.mark.slow  # ~1-2 min on 2 CPU cores, mostly compilation (plus the session's zoo build)
def test_agents_learn_and_best_scores_are_fresh_forward_scores(zoo_run):
    cfg, batch, data, res = zoo_run
    c = CFG.ppo.chunk_iterations
    first, last = res.history.reward[:c].mean(0), res.history.reward[-c:].mean(0)
    print(f"\nmean minibatch reward per preference: first chunk {first}, last chunk {last}")
    assert np.all(last > first), (first, last)
    pool = LayerPool(data.layers, (), ())
    for i in range(len(PREFS)):
        shell = jax.tree.map(lambda x, i=i: x[i], data.shells)
        score = make_path_scorer(cfg, shell, pool, batch, len(TASK_NAMES), chunk_size=CFG.score_chunk)
        _, loglik = score(jnp.asarray(res.global_paths[i]))
        np.testing.assert_allclose(np.asarray(loglik), res.best.scores[i], rtol=1e-5, atol=1e-6)
        length = int((res.global_paths[i] >= 0).sum())
        want = float(PREFS[i] @ np.asarray(loglik)) - CFG.env.length_penalty * length
        np.testing.assert_allclose(res.best.reward[i], want, rtol=1e-5, atol=1e-6)
