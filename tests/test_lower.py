"""Lower level: the path MDP, PPO agents (both heads, per-λ and λ-conditioned), baselines, resume.

The synthetic tests need no model: a path's score on objective k is the fraction of its steps that
match a target path t_k, so under a weighted-sum reward the best path is the target of the heaviest
objective. Compiled programs are shared through module fixtures (compilation dominates the runtime).
"""

from types import SimpleNamespace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.search.agent import AgentConfig
from hm3jax.search.env import EnvConfig, PathLayout, PathProblem, Scorer
from hm3jax.search.lower import LowerConfig, propose, restore_lower_state, run_lower
from hm3jax.search.path_baselines import PathSearchConfig, canonical, make_path_search
from hm3jax.search.ppo import PPOConfig, make_train
from hm3jax.settings import UpperConfig, old_agent, old_env, old_ppo

K, L = 2, 3
ENV = old_env(stop=False, length_penalty=0.0)
LAYOUT = PathLayout.make(ENV, K, L)
# local actions: expert 0 = 0..2, expert 1 = 3..5, merged = 6..8 (the identity path, favoured at start)
TARGETS = jnp.asarray([[0, 1, 2], [5, 4, 3]])
PREFS = jnp.asarray([[0.8, 0.2], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7]])
OPTIMUM = np.asarray([[0, 1, 2], [5, 4, 3], [0, 1, 2], [5, 4, 3]])
BEST_REWARD = np.asarray([0.8, 0.8, 0.7, 0.7])
PPO = old_ppo(num_envs=32, iterations=40, chunk_iterations=8, lr=3e-3, critic_lr=3e-3)
CHUNKS = PPO.num_chunks


def _match(data, paths, block, key=None):
    # blocks are 0 here, so local and global indices agree on the experts' layers
    return jnp.mean(paths[:, None, :] == TARGETS[None], axis=-1).astype(jnp.float32)


SCORER = Scorer(lambda d, p, b, k: _match(d, p, b), lambda d, p, b: _match(d, p, b))


def problems(n=4):
    return PathProblem(PREFS[:n], jnp.ones((n, K)), jnp.zeros((n,), jnp.int32),
                       jax.random.normal(jax.random.key(5), (n, (K + 1) * L, 4)))


_TRAINERS = {}


def trainer(head, mode):
    if (head, mode) not in _TRAINERS:
        agent = old_agent(head=head, proto_std=0.4, knn=8, epsilon=0.2, hidden_dim=32, mlp_dim=32,
                          embed_dim=16)
        ppo = PPOConfig(**{**PPO.__dict__, "mode": mode})
        _TRAINERS[head, mode] = make_train(ENV, agent, ppo, LAYOUT, SCORER)
    return _TRAINERS[head, mode]


@pytest.fixture(scope="module")
def categorical_run():
    tr = trainer("categorical", "per_preference")
    return tr, run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS)


@pytest.mark.slow
def test_identity_path_is_likely_at_the_start():
    """Before training, the identity path over the merged model has the prior's probability
    identity_prob ** L, and every other path far less."""
    from hm3jax.search import agent as ag

    cfg = old_agent(hidden_dim=32, mlp_dim=32, embed_dim=16)
    params = ag.init_agent(cfg, LAYOUT, 4, K, jax.random.key(1))
    p = jax.tree.map(lambda x: x[0], problems(1))
    path_prob = jax.jit(lambda a: jnp.exp(ag.evaluate(cfg, LAYOUT, params, p, a, jnp.zeros((L, 1)))[0].sum()))
    identity = float(path_prob(jnp.asarray([6, 7, 8])))
    np.testing.assert_allclose(identity, cfg.identity_prob ** L, rtol=0.05)
    assert float(path_prob(TARGETS[0])) < identity / 20


# Runtimes below: a 2-core CPU shared with other jobs; compilation is most of each.
@pytest.mark.slow  # ~30 s each (categorical), ~30-45 s (Wolpertinger, which runs 4x the iterations)
@pytest.mark.parametrize("head,mode", [
    ("categorical", "per_preference"), ("categorical", "conditioned"),
    pytest.param("wolpertinger", "per_preference", marks=pytest.mark.slow),
    pytest.param("wolpertinger", "conditioned", marks=pytest.mark.slow)])
def test_synthetic_each_preference_reaches_its_optimum(head, mode, categorical_run):
    if (head, mode) == ("categorical", "per_preference"):
        res = categorical_run[1]
    else:
        # the Wolpertinger head learns slower (its actions are looked up around a Gaussian proto-action)
        chunks = CHUNKS if head == "categorical" else 4 * CHUNKS
        res = run_lower(trainer(head, mode), LAYOUT, problems(), None, jax.random.key(0), chunks)
    np.testing.assert_array_equal(res.best.path, OPTIMUM)
    np.testing.assert_allclose(res.best.reward, BEST_REWARD, rtol=1e-5)
    c = PPO.chunk_iterations
    first, last = res.history.reward[:c].mean(0), res.history.reward[-c:].mean(0)
    if head == "categorical":  # the policy itself has converged, not only the best path seen
        assert np.all(last > first + 0.1), (first, last)
        assert np.all(last > 0.9 * BEST_REWARD), last
    else:  # its ε-random picks (ε = 0.2) keep the mean reward well below the best path's
        assert np.all(last > first), (first, last)
    if (head, mode) == ("categorical", "conditioned"):
        # one λ-conditioned agent answers preferences it was not trained on, without training
        for lam, want in (([0.9, 0.1], [0, 1, 2]), ([0.1, 0.9], [5, 4, 3])):
            p = PathProblem(jnp.asarray(lam), jnp.ones(K), jnp.asarray(0, jnp.int32), problems(1).summary[0])
            got = propose(trainer(head, mode), LAYOUT, ENV, SCORER, res.state.params, p, None,
                          jax.random.key(3))
            assert got.path.tolist() == want, (lam, got)


@pytest.mark.slow  # ~20 s: compiles the single-agent program
def test_vmap_over_preferences_equals_separate_runs():
    """N=4 agents vmapped == each agent's own program run alone with its key (one chunk).

    Compared over one chunk: the two programs sum in different orders (batched vs single matmuls),
    and once a rounding difference flips one sampled action, the runs part ways, as any two
    differently compiled RL runs do.
    """
    tr = trainer("categorical", "per_preference")
    state, metrics = tr.chunk(tr.init(jax.random.key(0), problems()), problems(), None)
    keys = jax.random.split(jax.random.key(0), 4)
    chunk = jax.jit(tr.group_chunk)
    for i in range(4):
        p = jax.tree.map(lambda x, i=i: x[i:i + 1], problems())
        alone, m = chunk(jax.jit(tr.group_init)(keys[i], p), p, None)
        np.testing.assert_array_equal(np.asarray(alone.cache.paths[0]), np.asarray(state.cache.paths[i, 0]))
        np.testing.assert_array_equal(np.asarray(alone.cache.count[0]), np.asarray(state.cache.count[i, 0]))
        np.testing.assert_allclose(np.asarray(m.reward[:, 0]), np.asarray(metrics.reward[:, i]), atol=1e-5)
        for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), atol=1e-4)


@pytest.mark.slow  # ~20 s (shares the compiled programs of the synthetic runs)
def test_checkpoint_resume_equals_unbroken_run(categorical_run, tmp_path):
    tr, unbroken = categorical_run
    first = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS, checkpoint_dir=tmp_path,
                      stop_after=2)
    assert first.history.reward.shape[0] == 2 * PPO.chunk_iterations
    # the saved state is the same program's input as a fresh one: a resume reuses the compiled chunk
    saved = restore_lower_state(tr, problems(), None, jax.random.key(0), CHUNKS, tmp_path)
    fresh = tr.init(jax.random.key(0), problems())
    assert tr.chunk.lower(saved, problems(), None).as_text() == tr.chunk.lower(fresh, problems(), None).as_text()
    resumed = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS, checkpoint_dir=tmp_path)
    # the history of the restored chunks comes back from the checkpoint with the state
    assert resumed.history.reward.shape[0] == CHUNKS * PPO.chunk_iterations
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(unbroken.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(resumed.history), jax.tree.leaves(unbroken.history)):
        np.testing.assert_array_equal(a, b)
    # killed after the last chunk was saved: the same call restores everything, runs nothing
    again = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(again.history.reward, unbroken.history.reward)
    np.testing.assert_array_equal(again.best.path, unbroken.best.path)


@pytest.mark.parametrize("method", ["random", "evolution"])
@pytest.mark.slow
def test_path_baselines_on_the_synthetic_reward(method):
    cfg = PathSearchConfig(method=method, population=32, iterations=16, chunk_iterations=8)
    tr = make_path_search(cfg, ENV, LAYOUT, SCORER)
    res = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), cfg.num_chunks)
    if method == "evolution":
        np.testing.assert_array_equal(res.best.path, OPTIMUM)
    else:  # 512 uniform draws from 9 ** 3 paths: at least two of the three steps right
        assert np.all(res.best.reward >= 2 / 3 * BEST_REWARD - 1e-6), res.best.reward
    scored = res.history.paths_scored
    if method == "random":  # uniform draws rarely repeat: the whole budget is spent
        assert scored[-1].tolist() == [cfg.budget] * 4
    else:  # a converged population re-draws scored paths, which cost nothing
        # (the first generation's mutants of the identity path may repeat a few)
        assert np.all(scored[-1] <= cfg.budget) and np.all(scored[0] >= cfg.population - 4)
    assert np.all(np.diff(scored, axis=0) >= 0)


def _misleading_rows(data, paths, block, key=None):
    # the search rows: the true score plus a fixed error per path of up to +-0.3, so the paths that
    # look best on the rows are often not the best on the whole split (as with few real rows)
    h = jnp.sum(jnp.maximum(paths, 0) * jnp.asarray([7, 13, 29]), -1) % 11
    return _match(data, paths, block) + 0.06 * (h[:, None] - 5).astype(jnp.float32)


@pytest.mark.parametrize("searcher", ["random", pytest.param("ppo", marks=pytest.mark.slow)])  # ppo: ~30 s compile
def test_the_racing_answer_keeps_the_best_rescored_path_and_leaves_the_search_alone(searcher, tmp_path):
    """lower.env.rescore_each_chunk: after every chunk the best re-scored path so far is the answer,
    so it never gets worse with more chunks; the search (its cache) is the same as without; and it
    keeps an early path that the end-only rule loses to later row-noise winners; resumed == unbroken."""
    scorer = Scorer(lambda d, p, b, k: _misleading_rows(d, p, b), lambda d, p, b: _match(d, p, b))
    race_env = old_env(stop=False, length_penalty=0.0, rescore_each_chunk=True)
    if searcher == "random":
        cfg = PathSearchConfig(method="random", population=8, iterations=16, chunk_iterations=2)
        end, race = (make_path_search(cfg, e, LAYOUT, scorer) for e in (ENV, race_env))
    else:
        cfg = old_ppo(num_envs=16, new_paths=8, iterations=16, chunk_iterations=2, minibatches=2)
        agent = old_agent(hidden_dim=32, mlp_dim=32, embed_dim=16)
        end, race = (make_train(e, agent, cfg, LAYOUT, scorer) for e in (ENV, race_env))
    probs = problems()
    s_end = s_race = end.init(jax.random.key(2), probs)
    kept = np.full(4, -np.inf, np.float32)
    for _ in range(cfg.num_chunks):
        s_end, _ = end.chunk(s_end, probs, None)
        s_race, _ = race.chunk(s_race, probs, None)
        for a, b in zip(jax.tree.leaves(s_end.cache), jax.tree.leaves(s_race.cache)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # the end-only rule, asked now, and the best of what it answered at every chunk so far
        kept = np.maximum(kept, np.asarray(end.best(end.finish(s_end, probs, None)).reward))
        np.testing.assert_array_equal(np.asarray(race.best(s_race).reward), kept)
    final_end = np.asarray(end.best(end.finish(s_end, probs, None)).reward)
    np.testing.assert_array_equal(np.asarray(race.best(race.finish(s_race, probs, None)).reward), kept)  # idempotent
    assert np.all(kept >= final_end), (kept, final_end)
    if searcher == "random":  # with this key the end-only rule loses an early path (found by trying keys)
        assert np.any(kept > final_end), (kept, final_end)
    # the racing answer lives in the checkpointed state: a resumed run answers as the unbroken one
    run = lambda **kw: run_lower(race, LAYOUT, probs, None, jax.random.key(2), cfg.num_chunks, **kw)
    run(checkpoint_dir=tmp_path, stop_after=cfg.num_chunks // 2 + 1)
    resumed = run(checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.best.reward, kept)
    np.testing.assert_array_equal(resumed.best.path, np.asarray(race.best(s_race).path))


def test_canonical_paths_end_at_stop():
    layout = PathLayout.make(old_env(t_max=4, stop=True), 2, 2)
    genes = jnp.asarray([[0, 6, 1, 2], [6, 6, 6, 6], [1, 2, 3, 4]])
    assert canonical(layout, genes).tolist() == [[0, 6, -1, -1], [6, -1, -1, -1], [1, 2, 3, 4]]


@pytest.mark.parametrize("make,field,match", [
    (lambda: EnvConfig(reward="sum"), "lower.env.reward", "one of weighted_sum, tchebycheff"),
    (lambda: EnvConfig(actions="free", t_max=0), "lower.env.t_max", "None or an integer >= 1"),
    (lambda: EnvConfig(length_penalty=-1.0), "lower.env.length_penalty", ">= 0"),
    (lambda: EnvConfig(search_minibatch=0), "lower.env.search_minibatch", "an integer >= 1"),
    (lambda: EnvConfig(rescore_each_chunk="yes"), "lower.env.rescore_each_chunk", "true or false"),
    (lambda: AgentConfig(head="dqn"), "lower.agent.head", "one of categorical, wolpertinger"),
    (lambda: AgentConfig(epsilon=1.5), "lower.agent.epsilon", r"in \[0, 1\]"),
    (lambda: AgentConfig(identity_prob=1.0), "lower.agent.identity_prob", r"in \[0, 1\)"),
    (lambda: AgentConfig(knn=0), "lower.agent.knn", "an integer >= 1"),
    (lambda: PPOConfig(gamma=1.5), "lower.ppo.gamma", r"in \[0, 1\]"),
    (lambda: PPOConfig(iterations=10, chunk_iterations=4), "lower.ppo.iterations", "a multiple of"),
    (lambda: PPOConfig(num_envs=30, minibatches=4), "lower.ppo.num_envs", "a multiple of"),
    (lambda: PPOConfig(lr=0.0), "lower.ppo.lr", "> 0"),
    (lambda: PPOConfig(mode="shared"), "lower.ppo.mode", "one of per_preference, conditioned"),
    (lambda: LowerConfig(objective="bleu"), "lower.objective",
     r"None \(tasks.objective\) or one of exact_match, loglik"),
    (lambda: PathSearchConfig(candidates=8, population=32), "lower.baseline.candidates",
     r"None or an integer >= population=32"),
    (lambda: PPOConfig(new_paths=64, num_envs=32), "lower.ppo.new_paths", r"None or an integer in \[1, num_envs=32\]"),
    (lambda: PPOConfig(baseline="mean"), "lower.ppo.baseline", "one of critic, pomo"),
    (lambda: EnvConfig(actions="tree"), "lower.env.actions", "one of free, edit"),
    (lambda: EnvConfig(actions="edit", t_max=4), "lower.env.t_max", "None with lower.env.actions edit"),
    (lambda: PathSearchConfig(mutation_rate=2.0), "lower.baseline.mutation_rate", r"in \[0, 1\]"),
    # the upper level's section validates with the same helper (settings.require)
    (lambda: UpperConfig(method="magic"), "upper.method", "one of task_arithmetic, ties, dare_ties, auto, got 'magic'"),
    (lambda: UpperConfig(density_range=(0.5, 0.3)), "upper.density_range",
     r"\(lo, hi\) with 0 < lo < hi <= 1, got \(0.5, 0.3\)"),
    (lambda: UpperConfig(scale_range=(2.0, 1.0)), "upper.scale_range", r"\(lo, hi\) with 0 < lo < hi"),
    (lambda: UpperConfig(es_population=1), "upper.es_population", ">= 2, got 1"),
    (lambda: UpperConfig(es_generations=0), "upper.es_generations", ">= 1, got 0"),
])
def test_config_errors_name_the_field(make, field, match):
    with pytest.raises(ValueError, match=f"{field} must be {match}"):
        make()


def test_conditioned_mode_needs_a_conditioned_agent():
    with pytest.raises(ValueError, match="lower.agent.condition must be True"):
        make_train(ENV, old_agent(condition=False), old_ppo(mode="conditioned"), LAYOUT, SCORER)


# ---------------------------------------------------------------------------------------------
# The edit action space, the path cache and the budget in distinct paths.
# K = 3 experts of L = 6 layers; objective k's target is the merge's identity path with expert k's
# layer at two positions, so the optimum of a preference leaning to k is a small edit of the merge.
EK, EL = 3, 6
EDIT_ENV = old_env(actions="edit", length_penalty=0.0)
EDIT = PathLayout.make(EDIT_ENV, EK, EL)
_MERGED = EK * EL + np.arange(EL)
_SWAPS = {0: (1, 4), 1: (0, 3), 2: (2, 5)}
EDIT_TARGETS = jnp.asarray(np.stack([np.where(np.isin(np.arange(EL), _SWAPS[k]), k * EL + np.arange(EL), _MERGED)
                                     for k in range(EK)]))
EDIT_PREFS = jnp.asarray([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])


def _edit_match(data, paths, block, key=None):
    return jnp.mean(paths[:, None, :] == EDIT_TARGETS[None], axis=-1).astype(jnp.float32)


EDIT_SCORER = Scorer(lambda d, p, b, k: _edit_match(d, p, b), lambda d, p, b: _edit_match(d, p, b))
EDIT_PPO = old_ppo(num_envs=64, new_paths=16, iterations=16, chunk_iterations=8, minibatches=2,
                   baseline="pomo", sil_coef=0.5, explore=64, lr=3e-3, critic_lr=3e-3)


def edit_problems(prefs=EDIT_PREFS):
    n = prefs.shape[0]
    return PathProblem(prefs, jnp.ones((n, EK)), jnp.zeros((n,), jnp.int32),
                       jax.random.normal(jax.random.key(5), (n, (EK + 1) * EL, 4)))


_EDIT_TRAINERS = {}


def edit_trainer(mode):
    if mode not in _EDIT_TRAINERS:
        agent = old_agent(hidden_dim=32, mlp_dim=32, embed_dim=16, identity_prob=0.7)
        _EDIT_TRAINERS[mode] = make_train(EDIT_ENV, agent, PPOConfig(**{**EDIT_PPO.__dict__, "mode": mode}),
                                          EDIT, EDIT_SCORER)
    return _EDIT_TRAINERS[mode]


_EDIT_RUNS = {}


def edit_run(mode):
    """The unbroken edit-action run of `mode` (key 0), run once for the tests that read it."""
    if mode not in _EDIT_RUNS:
        _EDIT_RUNS[mode] = run_lower(edit_trainer(mode), EDIT, edit_problems(), None, jax.random.key(0),
                                     EDIT_PPO.num_chunks)
    return _EDIT_RUNS[mode]


def test_edit_genes_decode_to_the_merge_and_its_edits():
    keep, skip, repeat = EDIT.keep_gene, EDIT.skip_gene, EDIT.repeat_gene
    genes = jnp.asarray([[keep] * EL,
                         [keep, 2, keep, skip, repeat, keep],     # expert 1's layer 1; skip; repeat layer 2
                         [skip, repeat, 3, keep, keep, keep]])    # a repeat before any layer runs nothing
    m = EK * EL
    assert en_decode(genes).tolist() == [
        [m, m + 1, m + 2, m + 3, m + 4, m + 5],
        [m, EL + 1, m + 2, m + 2, m + 5, -1],
        [2 * EL + 2, m + 3, m + 4, m + 5, -1, -1]]


def en_decode(genes):
    from hm3jax.search import env as en

    return en.decode(EDIT, genes)


def test_path_cache_scores_each_distinct_path_once():
    from hm3jax.search import cache as pc
    from hm3jax.search.ppo import evaluate_batch

    calls = []

    def counting(d, p, b, k):
        calls.append(p.shape[0])
        return _edit_match(d, p, b)

    scorer = Scorer(counting, lambda d, p, b: _edit_match(d, p, b))
    prob = jax.tree.map(lambda x: x[0], edit_problems())
    cache = pc.empty(8, EL, EK)
    ident = jnp.zeros((EL,), jnp.int32)
    other = ident.at[1].set(1)
    skip_first = ident.at[0].set(EDIT.skip_gene)
    # a path sampled twice in a batch is scored once; new_paths=2 leaves the fifth unscored
    genes = jnp.stack([ident, other, ident, other, skip_first])
    cache, scored, scores, _, _ = evaluate_batch(EDIT_ENV, EDIT, scorer, None, prob, cache, genes, 2)
    assert int(cache.count) == 2 and scored.tolist() == [True, True, True, True, False]
    np.testing.assert_array_equal(scores[0], scores[2])
    cache, scored, scores2, _, _ = evaluate_batch(EDIT_ENV, EDIT, scorer, None, prob, cache, genes, 2)
    assert int(cache.count) == 3 and scored.all()  # only the new path was scored
    np.testing.assert_array_equal(scores2[:4], scores[:4])  # a re-sampled path keeps its score
    want = _edit_match(None, en_decode(genes), 0)
    np.testing.assert_allclose(scores2, want)


@pytest.mark.slow  # ~40 s: two agents and the random search
@pytest.mark.parametrize("mode", ["per_preference", "conditioned"])
def test_agent_finds_the_edit_optimum_where_random_search_does_not(mode):
    res = edit_run(mode)
    assert res.history.paths_scored[-1].tolist() == [EDIT_PPO.budget] * 3  # 256 distinct paths each
    np.testing.assert_array_equal(res.best.path, np.asarray(EDIT_TARGETS))
    rnd = PathSearchConfig(method="random", population=16, candidates=64, iterations=16, chunk_iterations=8)
    base = run_lower(make_path_search(rnd, EDIT_ENV, EDIT, EDIT_SCORER), EDIT, edit_problems(), None,
                     jax.random.key(0), rnd.num_chunks)
    assert base.history.paths_scored[-1].tolist() == [rnd.budget] * 3
    # random search reaches the optimum of at most one preference and is behind on average
    assert (base.best.path == np.asarray(EDIT_TARGETS)).all(1).sum() <= 1, base.best.path
    assert base.best.reward.mean() < res.best.reward.mean() - 0.05, (base.best.reward, res.best.reward)


@pytest.mark.slow
def test_conditioned_edit_agent_answers_an_unseen_preference():
    tr, res = edit_trainer("conditioned"), edit_run("conditioned")
    p = jax.tree.map(lambda x: x[0], edit_problems(jnp.asarray([[0.7, 0.2, 0.1]])))
    got = propose(tr, EDIT, EDIT_ENV, EDIT_SCORER, res.state.params, p, None)
    assert got.path.tolist() == np.asarray(EDIT_TARGETS[0]).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_preference", "conditioned"])
def test_edit_resume_equals_unbroken_run(mode, tmp_path):
    tr, unbroken = edit_trainer(mode), edit_run(mode)
    run_lower(tr, EDIT, edit_problems(), None, jax.random.key(0), EDIT_PPO.num_chunks, checkpoint_dir=tmp_path,
              stop_after=1)
    resumed = run_lower(tr, EDIT, edit_problems(), None, jax.random.key(0), EDIT_PPO.num_chunks,
                        checkpoint_dir=tmp_path)
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(unbroken.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(resumed.history.reward, unbroken.history.reward)


# ---------------------------------------------------------------------------------------------
# The searcher protocol (search.base), run_lower's hooks and ppo's module-level pieces.
class _Count(NamedTuple):
    """A toy searcher's state: chunks run and a running sum per preference."""

    chunks: jax.Array
    total: jax.Array


def toy_searcher(c=2):
    """The smallest search.base.Searcher (init, chunk, best; no finish): iteration i of chunk j
    reports reward j * c + i + 1 for every preference, and the identity path is its answer."""
    from hm3jax.search import env as en
    from hm3jax.search.base import ChunkMetrics

    def init(key, problems):
        n = problems.preference.shape[0]
        return _Count(jnp.zeros((), jnp.int32), jnp.zeros((n,)))

    def chunk(state, problems, data):
        n = problems.preference.shape[0]
        r = (state.chunks * c + jnp.arange(1, c + 1)).astype(jnp.float32)[:, None] * jnp.ones((c, n))
        z = jnp.zeros((c, n))
        m = ChunkMetrics(r, jnp.zeros((c, n, K)), z, r, z, z, z, jnp.broadcast_to(r.astype(jnp.int32), (c, n)))
        return _Count(state.chunks + 1, state.total + r.sum(0)), m

    def best(state):
        n = state.total.shape[0]
        ident = jnp.broadcast_to(en.decode(LAYOUT, LAYOUT.identity_gene(jnp.arange(LAYOUT.t_max)).astype(jnp.int32)),
                                 (n, LAYOUT.t_max))
        return en.BestPaths(ident, jnp.zeros((n, K)), state.total, jnp.zeros((n,)))

    return SimpleNamespace(init=jax.jit(init), chunk=jax.jit(chunk), best=best)


class _Recorder:
    """A hook with begin and close, recording what it sees."""

    def __init__(self, fail_at=None):
        self.events, self.fail_at = [], fail_at

    def begin(self, start, num_chunks):
        self.events.append(("begin", start, num_chunks))

    def __call__(self, info):
        self.events.append(("chunk", info.chunk, info.num_chunks, float(info.metrics.reward[0, 0]),
                            int(info.state.chunks)))
        # the history holds every chunk so far, this one included
        np.testing.assert_array_equal(info.history.reward[info.chunk], info.metrics.reward)
        if info.chunk == self.fail_at:
            raise RuntimeError(f"hook failed at chunk {info.chunk}")

    def close(self):
        self.events.append(("close",))


def test_hooks_see_every_chunk_in_order_after_the_shorthands():
    from hm3jax.search.lower import ChunkInfo, log_hook

    calls = []
    rec = _Recorder()
    res = run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3,
                    log=lambda c, m: calls.append(("log", c)),
                    hooks=[rec, lambda info: calls.append(("fn", info.chunk)),
                           log_hook(lambda c, m: calls.append(("log2", c, float(m.reward[-1, 1]))))])
    assert rec.events == [("begin", 0, 3), ("chunk", 0, 3, 1.0, 1), ("chunk", 1, 3, 3.0, 2),
                          ("chunk", 2, 3, 5.0, 3), ("close",)]
    # the log shorthand runs before the hooks given, and they in their order
    assert calls == [x for c in range(3) for x in (("log", c), ("fn", c), ("log2", c, 2.0 * c + 2))]
    assert res.history.reward[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(res.best.reward, [21.0, 21.0])  # a searcher without finish
    assert ChunkInfo._fields == ("chunk", "num_chunks", "state", "metrics", "history")


def test_a_failing_hook_stops_the_run_after_the_checkpoint_and_resuming_continues(tmp_path):
    rec = _Recorder(fail_at=1)
    with pytest.raises(RuntimeError, match="hook failed at chunk 1"):
        run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 4, checkpoint_dir=tmp_path,
                  hooks=[rec])
    assert rec.events[-1][:2] == ("chunk", 1)  # nothing after the failure, no close
    # the checkpoint hook runs first: chunk 1 was saved before the failing hook saw it
    again = _Recorder()
    res = run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 4, checkpoint_dir=tmp_path,
                    hooks=[again])
    assert again.events == [("begin", 2, 4), ("chunk", 2, 4, 5.0, 3), ("chunk", 3, 4, 7.0, 4), ("close",)]
    unbroken = run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 4)
    np.testing.assert_array_equal(res.history.reward, unbroken.history.reward)
    np.testing.assert_array_equal(res.best.reward, unbroken.best.reward)


def test_checkpoint_hook_given_as_a_hook_resumes_and_only_one_may(tmp_path, monkeypatch):
    from hm3jax.search import hooks, lower

    saved = []
    orig = hooks._save_chunk
    # every chunk checkpoint goes through hooks._save_chunk (tests/killpoints.py wraps it)
    monkeypatch.setattr(hooks, "_save_chunk", lambda mngr, step, tree: (saved.append(step), orig(mngr, step, tree)))
    run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3,
              hooks=[lower.checkpoint_hook(tmp_path)], stop_after=2)
    assert saved == [1, 2]
    rec = _Recorder()
    res = run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3,
                    hooks=[lower.checkpoint_hook(tmp_path), rec])
    assert rec.events[0] == ("begin", 2, 3) and res.history.reward[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="more than one hook restores a checkpoint"):
        run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3, checkpoint_dir=tmp_path,
                  hooks=[lower.checkpoint_hook(tmp_path)])


def test_restore_lower_state_reads_the_latest_chunk_and_refuses_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved chunk of the search"):
        restore_lower_state(toy_searcher(), problems(2), None, jax.random.key(0), 3, tmp_path)
    res = run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3, checkpoint_dir=tmp_path,
                    stop_after=2)
    saved = restore_lower_state(toy_searcher(), problems(2), None, jax.random.key(0), 3, tmp_path)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(res.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_progress_hook_counts_the_chunks_restored_ones_included(tmp_path):
    from hm3jax.search.lower import progress_hook

    run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3, checkpoint_dir=tmp_path,
              stop_after=1)
    bar = progress_hook("toy")
    run_lower(toy_searcher(), LAYOUT, problems(2), None, jax.random.key(0), 3, checkpoint_dir=tmp_path,
              hooks=[bar])
    assert (bar.bar.n, bar.bar.total, bar.bar.desc) == (3, 3, "toy")
    assert bar.bar.postfix == "paths=6, reward=6"  # the last iteration's


def test_search_base_is_the_one_home_of_the_protocol():
    from hm3jax import settings
    from hm3jax.search import base, hooks, lower, path_baselines, ppo

    # the old import paths name the same objects
    for name in ("ChunkInfo", "ChunkCheckpointer", "Hook", "ProgressBar", "checkpoint_hook", "log_hook",
                 "progress_hook"):
        assert getattr(lower, name) is getattr(hooks, name)
    assert ppo.ChunkMetrics is base.ChunkMetrics and ppo.Trainer is base.Trainer
    assert lower.ChunkMetrics is base.ChunkMetrics and path_baselines.Trainer is base.Trainer
    assert ppo.raw_key is base.raw_key and ppo.wrap_key is base.wrap_key
    # one validation helper for every search config
    assert base.require is settings.require and path_baselines.require is settings.require


def test_make_train_refuses_the_wolpertinger_head_with_edit_actions():
    with pytest.raises(ValueError, match="lower.agent.head must be 'categorical' with lower.env.actions 'edit'"):
        make_train(EDIT_ENV, old_agent(head="wolpertinger"), old_ppo(), EDIT, EDIT_SCORER)


TINY_AGENT = old_agent(hidden_dim=16, mlp_dim=16, embed_dim=8, identity_prob=0.7)


def test_ppo_loss_alone_at_the_behaviour_policy():
    """ppo_loss of a rollout under the params that sampled it: the ratio is 1 (approx KL 0), the
    normalised advantages have mean 0 (policy term 0), the value loss is 0 when the targets are the
    values, so the loss is -ent_coef x the entropy."""
    from hm3jax.search import ppo as pp
    from hm3jax.search.agent import init_agent

    cfg = old_ppo(num_envs=8, ent_coef=0.01)
    probs = edit_problems()
    params = init_agent(TINY_AGENT, EDIT, probs.summary.shape[-1], EK, jax.random.key(1))
    traj = jax.jit(pp.rollout, static_argnums=(0, 1, 2))(TINY_AGENT, EDIT, 8, params, probs, jax.random.key(2))
    assert traj.actions.shape == (3, 8, EDIT.t_max) and traj.valid[:, :, 0].all()
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    adv = jax.random.normal(jax.random.key(3), traj.values.shape)
    loss = jax.jit(lambda *a: pp.ppo_loss(TINY_AGENT, EDIT, cfg, *a))
    each = jax.tree.map(lambda x: jnp.repeat(x, 8, axis=0), probs)
    total, (v_loss, ent, kl) = loss(params, each, jax.tree.map(flat, traj), flat(adv), flat(traj.values),
                                    jnp.ones((24,), bool), None)
    assert abs(float(kl)) < 1e-6 and float(v_loss) == 0.0 and float(ent) > 0
    np.testing.assert_allclose(float(total), -0.01 * float(ent), atol=1e-6)


@pytest.mark.slow  # ~35 s: compiles a chunk and its pieces
# conditioned only: per_preference runs the same pieces under one more vmap, at ~35 s more of compiling
@pytest.mark.parametrize("mode", ["conditioned"])
def test_trainer_chunk_is_the_module_level_pieces_composed(mode):
    """One iteration of the trainer's chunk == rollout, neighbours, evaluate_batch, advantages and
    update called by hand with the key splits the module docstring of ppo.iteration names."""
    from hm3jax.search import cache as pc
    from hm3jax.search import ppo as pp

    cfg = old_ppo(mode=mode, num_envs=8, new_paths=4, iterations=1, chunk_iterations=1, minibatches=2,
                  baseline="pomo", sil_coef=0.5, explore=8, local_share=0.5)
    tr = make_train(EDIT_ENV, TINY_AGENT, cfg, EDIT, EDIT_SCORER)
    probs = edit_problems()
    state0 = tr.init(jax.random.key(0), probs)
    state1, metrics = tr.chunk(state0, probs, None)
    tx = pp.optimizer(cfg)

    def by_hand(s, problems):  # one agent (a group of G problems)
        key, k_roll, k_upd = jax.random.split(pp.wrap_key(s.key), 3)
        traj = pp.rollout(TINY_AGENT, EDIT, 8, s.params, problems, k_roll)
        ks = jax.random.split(jax.random.fold_in(k_roll, 7), problems.preference.shape[0])
        extra = jax.vmap(lambda c, k: pp.neighbours(EDIT, c, k, 8, cfg.sil_elites))(s.cache, ks)
        n_local = pp.local_count(cfg)
        genes = jnp.concatenate([extra[:, :n_local], traj.actions, extra[:, n_local:]], axis=1)
        cache, scored, _, reward, _ = jax.vmap(
            lambda p, c, g: pp.evaluate_batch(EDIT_ENV, EDIT, EDIT_SCORER, None, p, c, g, 4))(problems, s.cache, genes)
        own = slice(n_local, n_local + 8)
        scored, reward = scored[:, own], jnp.where(scored[:, own], reward[:, own], 0.0)
        adv, targets = pp.advantages(EDIT_ENV, cfg, traj, reward, scored)
        e_genes, _, _, e_valid = jax.vmap(lambda c: pc.top(c, min(cfg.sil_elites, c.reward.shape[0])))(cache)
        params, _, _ = pp.update(TINY_AGENT, EDIT, cfg, tx, s.params, s.opt_state, problems, traj, adv,
                                 targets, scored, (problems, e_genes, e_valid), k_upd)
        w = scored.astype(jnp.float32)
        return params, cache, pp.raw_key(key), jnp.sum(reward * w, 1) / jnp.maximum(w.sum(1), 1.0)

    if mode == "per_preference":
        got = jax.jit(jax.vmap(by_hand))(state0, jax.tree.map(lambda x: x[:, None], probs))
    else:
        got = jax.jit(by_hand)(state0, probs)
    params, cache, key, reward = got
    np.testing.assert_allclose(np.asarray(reward).reshape(-1), np.asarray(metrics.reward[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(key), np.asarray(state1.key))
    np.testing.assert_array_equal(np.asarray(cache.paths), np.asarray(state1.cache.paths))
    np.testing.assert_array_equal(np.asarray(cache.count), np.asarray(state1.cache.count))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert metrics.reward.shape == (1, 3) and int(state1.iteration.max()) == 1
