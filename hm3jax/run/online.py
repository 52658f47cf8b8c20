"""Online search for a new preference with a finished run's λ-conditioned agent.

HM3's promise: one agent, trained offline over sampled preference vectors, answers a preference it
has not seen without retraining. For a run whose lower level trained one shared agent
(`lower.ppo.mode: conditioned`), `search_preference` takes that agent from the run's checkpoint
(RUN_DIR/checkpoints/lower), merges the upper level for the new λ (as the run merged its own
preferences, with the run's density and scale, and the method "auto" would pick for this λ), and either
takes the agent's most likely path as it is (`iterations=0`: zero-shot, no path scored to choose
it) or continues PPO for `iterations` iterations on this λ alone. The best path
is re-scored on the whole search split (the training signal) and then on the held-out split, and
returned as a solution record (run.record.Solution), so recommend can print it and export it.

Nothing is written to the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from hm3jax.config import CONFIG_FILE, RunConfigError, load_run_config, validate
from hm3jax.cost import path_cost
from hm3jax.run.record import Solution, UpperSettings
from hm3jax.settings import MERGE


class OnlineSearchError(ValueError):
    """A run that cannot answer a new preference online (no conditioned agent, unfinished run)."""


def check_run(run_dir: str | os.PathLike):
    """The run's validated config; OnlineSearchError unless it trained a λ-conditioned agent."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    try:
        cfg = validate(load_run_config(path))
    except RunConfigError as e:
        raise OnlineSearchError(f"{path}: {e}") from None
    if cfg.lower.ppo.mode != "conditioned":
        raise OnlineSearchError(f"{path}: lower.ppo.mode is {cfg.lower.ppo.mode!r}; an online search needs the "
                                "one λ-conditioned agent of a run with lower.ppo.mode: conditioned")
    agent = os.path.join(os.fspath(run_dir), "checkpoints", "lower")
    if not os.path.isdir(agent):
        raise OnlineSearchError(f"{agent}: no lower-level checkpoint (the run did not finish its lower level)")
    return cfg


def search_preference(run_dir: str | os.PathLike, preference: Sequence[float], iterations: int = 0,
                      seed: int = 0) -> Solution:
    """The solution for `preference` from the run's conditioned agent (see the module docstring).

    Args:
      run_dir: a finished run of a config with lower.ppo.mode: conditioned.
      preference: [K] λ on the simplex (recommend normalises it).
      iterations: PPO iterations on this λ (rounded up to whole chunks of lower.ppo.chunk_iterations);
        0 takes the agent's most likely path for λ as trained (no search budget spent).
      seed: seeds the sampling and the continued training (the upper-level merge uses the run's seed).
    Returns the Solution (its to_json() is the record recommend prints and exports).
    """
    # JAX and the run's stages load here, not at the top: recommend imports this module for its
    # check and its error type, and answers a plain pick without loading JAX
    import jax
    import jax.numpy as jnp

    from hm3jax.moo import tchebycheff
    from hm3jax.run import stages as st
    from hm3jax.run.context import load_context, upper_key
    from hm3jax.run.solutions import describe_path, switches_models
    from hm3jax.search import env as en
    from hm3jax.search.lower import make_lower_train, propose, restore_lower_state, with_batch
    from hm3jax.search.upper import AUTO, UPPER_METHODS, merge_for_preference

    if iterations < 0:
        raise OnlineSearchError(f"iterations must be >= 0, got {iterations}")
    run_dir = os.fspath(run_dir)
    cfg = check_run(run_dir)
    cfg = dataclasses.replace(cfg, output_dir=run_dir,
                              log=dataclasses.replace(cfg.log, tensorboard=False, progress=False))
    lam = np.asarray(preference, np.float32)
    ppo = cfg.lower.ppo
    # The stages print one line each; stdout is recommend's JSON, so they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        ctx = load_context(cfg)._replace(log=lambda record: None)  # nothing is logged into the run
        if lam.shape != (len(ctx.tasks),):
            raise OnlineSearchError(f"preference has {lam.size} weights for {len(ctx.tasks)} tasks")
        ideal = st.references(ctx)["ideal"]  # both restored from the run's stage store
        up = st.upper(ctx, ideal)

        # The new preference's upper-level merge: the run's method, density and scale (the first
        # preference's when the run tuned them per preference), a key of its own.
        density, scale = float(np.mean(up["density"])), float(np.mean(up["scale"]))
        key = jax.random.fold_in(upper_key(ctx), 10_000 + seed)
        method = cfg.upper.method
        if method == AUTO:  # the method whose merge for this λ scores best on the search split
            score = jax.jit(st.params_scorer(ctx, ctx.search))
            merge = jax.jit(merge_for_preference, static_argnums=0)
            values = [float(tchebycheff(score(merge(m, ctx.base, ctx.experts, jnp.asarray(lam), key,
                                                     jnp.float32(density), jnp.float32(scale))),
                                        jnp.asarray(lam), jnp.asarray(ideal))) for m in UPPER_METHODS]
            method = UPPER_METHODS[int(np.argmin(values))]
        new = merge_for_preference(method, ctx.base, ctx.experts, jnp.asarray(lam), key,
                                   jnp.float32(density), jnp.float32(scale))

        # The one search of this λ (the pool: the experts' layers and the new merge's)...
        data, problems, layout, fitted = st.setup_search(ctx, [new], lam[None], ideal, blocks="online")
        scorer = st.model_scorer(ctx)
        trainer = make_lower_train(cfg.lower, layout, scorer)
        # ...and the run's agent: the finished lower level's state, restored from its last chunk
        # checkpoint (its shapes are those of the run's N preferences; the agent's params are not).
        run_problems = jax.tree.map(lambda x: jnp.repeat(x, len(ctx.prefs), axis=0), problems)
        saved = restore_lower_state(trainer, run_problems, data, jax.random.key(cfg.seed), ppo.num_chunks,
                                    ctx.store.path("lower"))
        params, opt_state = saved.params, saved.opt_state
        if iterations:
            state = trainer.init(jax.random.key(seed), problems)._replace(params=params, opt_state=opt_state)
            for _ in range(math.ceil(iterations / ppo.chunk_iterations)):
                state, _ = trainer.chunk(state, problems, data)
            state = trainer.finish(state, problems, data)
            best = jax.tree.map(lambda x: np.asarray(x)[0], trainer.best(state))
        else:
            one = jax.tree.map(lambda x: x[0], problems)
            best = jax.tree.map(np.asarray, propose(trainer, layout, cfg.lower.env, scorer, params, one, data))
        # Held-out scores of the best path, as the run scores its own: the same pool, the held-out rows.
        held = with_batch(data, ctx.heldout, len(ctx.tasks), cfg.lower.score_chunk)
        glob = np.asarray(en.to_global(layout, jnp.asarray(best.path)[None], jnp.asarray(problems.block)[:, None]))
        heldout = np.asarray(jax.jit(scorer.full)(held, jnp.asarray(glob[0])[None], jnp.int32(0)))[0]
    path = describe_path(ctx, best.path, MERGE)
    upper = UpperSettings(method=method, density=density, scale=scale, seed=cfg.seed,
                          key_data=jax.random.key_data(key))
    return Solution(lam, upper, path, MERGE, best.scores, heldout,
                    path_cost(ctx.model_cfg, path, cfg.front.cost_seq_len),
                    aligned=fitted is not None and switches_models(path, MERGE))
