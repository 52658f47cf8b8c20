"""The lower-level field defaults from before they became the default run's search (since then
LowerConfig() == DEFAULT_LOWER, the settings of configs/default.yaml). The tests that build an
EnvConfig, AgentConfig, PPOConfig or LowerConfig were written and tuned on these, so they build them
with these builders (defined once, in hm3jax.settings, where the benchmarks take them too)."""

from hm3jax.settings import old_agent, old_env, old_lower, old_ppo

__all__ = ["old_agent", "old_env", "old_lower", "old_ppo"]
