"""A run's orchestration, in one direction (each module imports only those above it here):

    store      the stage store (orbax checkpoints + digests) and the metrics log
    record     Solution (and UpperSettings): a solution as a typed, frozen record; to_json() is its
               front.json record, from_json() reads one back (no JAX)
    context    Context: the validated config, models, batches, preferences, mesh, store; load_context;
               the key and method of each preference's upper-level merge
    solutions  the Solution values of stage results
    stages     the stages (references, upper, the path searches, baselines, held-out, generated),
               each saved in the store; setup_search builds a search's inputs once
    driver     run(cfg): every stage in order, then the front
    online     search_preference: a finished run's conditioned agent on a new preference
    export     export_path: a solution's path as a plain Hugging Face checkpoint (imports none of the above)

The entry points sit outside the package and never import each other: hm3jax.train (the command
line of driver.run), hm3jax.recommend (which calls online and export), and hm3jax.online and
hm3jax.export (the public names of online and export). This __init__ imports nothing, so
`hm3jax.run.online`'s checks load without JAX.
"""
