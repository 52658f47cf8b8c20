"""Online search for a new preference with a finished run's λ-conditioned agent (the public entry of
hm3jax.run.online, which `recommend --search-iterations N` calls): see hm3jax.run.online.

    solution = hm3jax.online.search_preference("runs/smoke", [0.2, 0.5, 0.3], iterations=8)
    record = solution.to_json()  # the record recommend prints and exports
"""

from hm3jax.run.online import OnlineSearchError, check_run, search_preference

__all__ = ["OnlineSearchError", "check_run", "search_preference"]
