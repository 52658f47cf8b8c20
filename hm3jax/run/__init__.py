"""A run's orchestration, in one direction (each module imports only those above it here):

    store      the stage store (orbax checkpoints + digests) and the metrics log
    context    Context: the validated config, models, batches, preferences, mesh, store; load_context;
               the key and method of each preference's upper-level merge
    solutions  front.json solution records from stage results
    stages     the stages (references, upper, the path searches, baselines, held-out, generated),
               each saved in the store; setup_search builds a search's inputs once
    driver     run(cfg): every stage in order, then the front
    online     search_preference: a finished run's conditioned agent on a new preference

The entry points sit outside the package and never import each other: hm3jax.train (the command
line of driver.run), hm3jax.recommend (and hm3jax.online, the public name of run.online), and
hm3jax.export. This __init__ imports nothing, so `hm3jax.run.online`'s checks load without JAX.
"""
