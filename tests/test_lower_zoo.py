"""Lower level on the embedded zoo (conftest.small_zoo): PPO agents learn, and the best path's
recorded scores are what a fresh forward pass of that path gives on the same split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.models import LayerPool, forward_path
from hm3jax.objectives import TASK_NAMES, make_path_scorer, make_suite_batch
from hm3jax.search.lower import (
    build_search,
    make_lower_train,
    make_model_scorer,
    minibatch_rows,
    run_lower,
)
from hm3jax.search.upper import merge_for_preference
from hm3jax.settings import old_agent, old_env, old_lower, old_ppo
from hm3jax.zoo import BASE, SMALL

PREFS = np.asarray([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6]], np.float32)
# loglik: the small zoo's merges have ~0 exact match, a flat reward; the answer log-likelihood is not
CFG = old_lower(env=old_env(search_minibatch=48),
                agent=old_agent(embed_dim=16, hidden_dim=32, mlp_dim=32),
                ppo=old_ppo(num_envs=16, minibatches=2, iterations=24, chunk_iterations=4, lr=3e-3,
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


@pytest.mark.slow  # ~1 min: a short conditioned run in the edit action space
def test_conditioned_agent_answers_an_unseen_preference_with_a_fresh_forward_score(small_zoo_loaded):
    """One λ-conditioned agent (edit actions, POMO, self-imitation, neighbour search) trained on two
    preferences answers a third it never trained on: a valid path of the new preference's pool
    whose recorded scores are a fresh forward pass's on the whole search split."""
    from hm3jax.search import env as en
    from hm3jax.search.lower import propose

    cfg, models, tokenizer = small_zoo_loaded
    batch = make_suite_batch(SMALL.suite(), "search", tokenizer)
    experts = [models[t] for t in TASK_NAMES]
    prefs = np.concatenate([PREFS, np.asarray([[0.3, 0.5, 0.2]], np.float32)])
    merged = [merge_for_preference("task_arithmetic", models[BASE], experts, p, jax.random.key(0)) for p in prefs]
    lc = old_lower(env=old_env(actions="edit", search_minibatch=48),
                   agent=old_agent(embed_dim=16, hidden_dim=32, mlp_dim=32, identity_prob=0.8),
                   ppo=old_ppo(mode="conditioned", num_envs=16, new_paths=8, minibatches=2, iterations=8,
                               chunk_iterations=4, baseline="pomo", sil_coef=0.5, explore=16,
                               local_share=0.5, lr=3e-3, critic_lr=3e-3),
                   objective="loglik")
    data, problems, layout = build_search(cfg, experts, merged, batch, prefs, np.zeros(3), lc, base=models[BASE])
    scorer = make_model_scorer(cfg, len(TASK_NAMES), lc)
    trainer = make_lower_train(lc, layout, scorer)
    seen = jax.tree.map(lambda x: x[:2], problems)
    res = run_lower(trainer, layout, seen, data, jax.random.key(0), lc.ppo.num_chunks)
    assert np.all(res.history.paths_scored[-1] <= lc.ppo.budget)  # distinct paths: at most the budget
    assert np.all(res.history.paths_scored[-1] >= lc.ppo.budget // 2)
    new = jax.tree.map(lambda x: x[2], problems)
    got = jax.tree.map(np.asarray, propose(trainer, layout, lc.env, scorer, res.state.params, new, data))
    path = got.path
    layers = path[path >= 0]
    assert len(layers) >= 1 and np.all(layers < layout.num_layer_actions) and np.all(path[len(layers):] == -1)
    glob = np.asarray(en.to_global(layout, jnp.asarray(path), jnp.asarray(2)))
    shell = jax.tree.map(lambda x: x[2], data.shells)
    score = make_path_scorer(cfg, shell, LayerPool(data.layers, (), ()), batch, len(TASK_NAMES),
                             chunk_size=lc.score_chunk)
    _, loglik = score(jnp.asarray(glob))
    np.testing.assert_allclose(np.asarray(loglik), got.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~1 min: a short conditioned run scored on answer probabilities
def test_search_rows_scored_by_answer_probability_and_the_answer_by_exact_match(small_zoo_loaded):
    """lower.env.search_score answer_prob: every cached search-row score is the mean probability of
    the answers on the fixed search rows (a fresh forward pass's), its reward uses the experts' best
    answer probability as z*, and the search's answer carries exact-match scores on the whole
    search split, never answer probabilities."""
    from hm3jax.objectives.scoring import answer_prob, make_params_scorer, task_means
    from hm3jax.search import env as en

    cfg, models, tokenizer = small_zoo_loaded
    batch = make_suite_batch(SMALL.suite(), "search", tokenizer)
    experts = [models[t] for t in TASK_NAMES]
    merged = [merge_for_preference("task_arithmetic", models[BASE], experts, p, jax.random.key(0)) for p in PREFS]
    lc = old_lower(env=old_env(actions="edit", search_minibatch=48, search_score="answer_prob",
                               reward="tchebycheff", length_penalty=0.0),
                   agent=old_agent(embed_dim=16, hidden_dim=32, mlp_dim=32, identity_prob=0.8),
                   ppo=old_ppo(mode="conditioned", num_envs=16, new_paths=8, minibatches=2, iterations=8,
                               chunk_iterations=4, baseline="pomo", sil_coef=0.5, explore=16,
                               local_share=0.5, lr=3e-3, critic_lr=3e-3))
    ideal = np.ones(3, np.float32)
    data, problems, layout = build_search(cfg, experts, merged, batch, PREFS, ideal, lc, base=models[BASE])
    prob = jax.jit(make_params_scorer(cfg, batch, 3, "answer_prob", 128))
    want_ideal = np.stack([np.asarray(prob(e)) for e in experts]).max(0)
    np.testing.assert_allclose(np.asarray(problems.search_ideal[0]), want_ideal, rtol=1e-5)
    assert np.all(want_ideal > 0) and np.all(want_ideal < 1)  # a probability, not exact match's 0/1 means
    scorer = make_model_scorer(cfg, len(TASK_NAMES), lc)
    trainer = make_lower_train(lc, layout, scorer)
    res = run_lower(trainer, layout, problems, data, jax.random.key(0), lc.ppo.num_chunks)
    # the search rows: the scorer's own fixed draw, re-made here by a fresh forward pass
    sub = minibatch_rows(data, jax.random.key(en._ROWS_SEED), 16)
    for i in range(len(PREFS)):
        cache = jax.tree.map(lambda x, i=i: np.asarray(x[i]), res.state.cache)
        assert int(cache.count) >= 8
        path = cache.paths[0]
        shell = jax.tree.map(lambda x, i=i: x[i], data.shells)
        glob = en.to_global(layout, jnp.asarray(path), jnp.asarray(i))
        fwd = jax.jit(lambda g, shell=shell: forward_path(cfg, shell, LayerPool(data.layers, (), ()), g, sub.tokens,
                                                        sub.attention_mask))
        logits = fwd(glob)
        fresh = np.asarray(task_means(answer_prob(logits, sub), sub, 3))
        np.testing.assert_allclose(cache.scores[0], fresh, rtol=1e-4, atol=1e-6)
        want = -np.max(PREFS[i] * np.abs(want_ideal - fresh))
        np.testing.assert_allclose(cache.reward[0], want, rtol=1e-4, atol=1e-6)
        # the answer: exact match on the whole split (a fresh scoring pass's)
        score = make_path_scorer(cfg, shell, LayerPool(data.layers, (), ()), batch, len(TASK_NAMES),
                                 chunk_size=lc.score_chunk)
        em, _ = score(jnp.asarray(res.global_paths[i]))
        np.testing.assert_allclose(np.asarray(em), res.best.scores[i], rtol=1e-5, atol=1e-6)
