"""Lower level: the path MDP, PPO agents (both heads, per-λ and λ-conditioned), baselines, resume.

The synthetic tests need no model: a path's score on objective k is the fraction of its steps that
match a target path t_k, so under a weighted-sum reward the best path is the target of the heaviest
objective. Compiled programs are shared through module fixtures (compilation dominates the runtime).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hm3jax.search.agent import AgentConfig
from hm3jax.search.env import EnvConfig, PathLayout, PathProblem, Scorer
from hm3jax.search.lower import LowerConfig, propose, run_lower
from hm3jax.search.path_baselines import PathSearchConfig, canonical, make_path_search
from hm3jax.search.ppo import PPOConfig, make_train

K, L = 2, 3
ENV = EnvConfig(stop=False, length_penalty=0.0)
LAYOUT = PathLayout.make(ENV, K, L)
# local actions: expert 0 = 0..2, expert 1 = 3..5, merged = 6..8 (the identity path, favoured at start)
TARGETS = jnp.asarray([[0, 1, 2], [5, 4, 3]])
PREFS = jnp.asarray([[0.8, 0.2], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7]])
OPTIMUM = np.asarray([[0, 1, 2], [5, 4, 3], [0, 1, 2], [5, 4, 3]])
BEST_REWARD = np.asarray([0.8, 0.8, 0.7, 0.7])
PPO = PPOConfig(num_envs=32, iterations=40, chunk_iterations=8, lr=3e-3, critic_lr=3e-3)
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
        agent = AgentConfig(head=head, proto_std=0.4, knn=8, epsilon=0.2, hidden_dim=32, mlp_dim=32,
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

    cfg = AgentConfig(hidden_dim=32, mlp_dim=32, embed_dim=16)
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
        np.testing.assert_array_equal(np.asarray(alone.best.path[0]), np.asarray(state.best.path[i, 0]))
        np.testing.assert_allclose(np.asarray(m.reward[:, 0]), np.asarray(metrics.reward[:, i]), atol=1e-5)
        for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), atol=1e-4)


@pytest.mark.slow  # ~20 s (shares the compiled programs of the synthetic runs)
def test_checkpoint_resume_equals_unbroken_run(categorical_run, tmp_path):
    tr, unbroken = categorical_run
    first = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS, checkpoint_dir=tmp_path,
                      stop_after=2)
    assert first.history.reward.shape[0] == 2 * PPO.chunk_iterations
    resumed = run_lower(tr, LAYOUT, problems(), None, jax.random.key(0), CHUNKS, checkpoint_dir=tmp_path)
    assert resumed.history.reward.shape[0] == (CHUNKS - 2) * PPO.chunk_iterations
    for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(unbroken.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(resumed.history.reward, unbroken.history.reward[2 * PPO.chunk_iterations:])


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
    assert res.history.paths_scored[-1].tolist() == [cfg.iterations * cfg.population] * 4


def test_canonical_paths_end_at_stop():
    layout = PathLayout.make(EnvConfig(t_max=4, stop=True), 2, 2)
    genes = jnp.asarray([[0, 6, 1, 2], [6, 6, 6, 6], [1, 2, 3, 4]])
    assert canonical(layout, genes).tolist() == [[0, 6, -1, -1], [6, -1, -1, -1], [1, 2, 3, 4]]


@pytest.mark.parametrize("make,field,match", [
    (lambda: EnvConfig(reward="sum"), "lower.env.reward", "one of weighted_sum, tchebycheff"),
    (lambda: EnvConfig(t_max=0), "lower.env.t_max", "None or an integer >= 1"),
    (lambda: EnvConfig(length_penalty=-1.0), "lower.env.length_penalty", ">= 0"),
    (lambda: EnvConfig(search_minibatch=0), "lower.env.search_minibatch", "an integer >= 1"),
    (lambda: AgentConfig(head="dqn"), "lower.agent.head", "one of categorical, wolpertinger"),
    (lambda: AgentConfig(epsilon=1.5), "lower.agent.epsilon", r"in \[0, 1\]"),
    (lambda: AgentConfig(identity_prob=1.0), "lower.agent.identity_prob", r"in \[0, 1\)"),
    (lambda: AgentConfig(knn=0), "lower.agent.knn", "an integer >= 1"),
    (lambda: PPOConfig(gamma=1.5), "lower.ppo.gamma", r"in \[0, 1\]"),
    (lambda: PPOConfig(iterations=10, chunk_iterations=4), "lower.ppo.iterations", "a multiple of"),
    (lambda: PPOConfig(num_envs=30, minibatches=4), "lower.ppo.num_envs", "a multiple of"),
    (lambda: PPOConfig(lr=0.0), "lower.ppo.lr", "> 0"),
    (lambda: PPOConfig(mode="shared"), "lower.ppo.mode", "one of per_preference, conditioned"),
    (lambda: LowerConfig(objective="bleu"), "lower.objective", "one of exact_match, loglik"),
    (lambda: PathSearchConfig(elite=32, population=32), "lower.baseline.elite",
     r"an integer in \[0, population=32\)"),
    (lambda: PathSearchConfig(mutation_rate=2.0), "lower.baseline.mutation_rate", r"in \[0, 1\]"),
])
def test_config_errors_name_the_field(make, field, match):
    with pytest.raises(ValueError, match=f"{field} must be {match}"):
        make()


def test_conditioned_mode_needs_a_conditioned_agent():
    with pytest.raises(ValueError, match="lower.agent.condition must be True"):
        make_train(ENV, AgentConfig(condition=False), PPOConfig(mode="conditioned"), LAYOUT, SCORER)
