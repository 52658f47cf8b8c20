"""The lower-level field defaults from before they became the default run's search (since then
LowerConfig() == DEFAULT_LOWER, the settings of configs/default.yaml). The tests that build an
EnvConfig, AgentConfig, PPOConfig or LowerConfig were written and tuned on these, so they build them
here and keep their settings: each helper is its config class with the old value of every field
whose default moved, under the keywords the test gives."""

from __future__ import annotations

from hm3jax.settings import AgentConfig, EnvConfig, LowerConfig, PPOConfig

OLD_ENV = dict(actions="free", reward="weighted_sum", search_minibatch=96, rescore_top=2)
OLD_AGENT = dict(identity_prob=0.5)
OLD_PPO = dict(mode="per_preference", num_envs=32, new_paths=None, iterations=64, minibatches=4,
               baseline="critic", sil_coef=0.0, explore=0, local_share=0.0, lr=1e-3, critic_lr=1e-3)


def old_env(**kw) -> EnvConfig:
    return EnvConfig(**{**OLD_ENV, **kw})


def old_agent(**kw) -> AgentConfig:
    return AgentConfig(**{**OLD_AGENT, **kw})


def old_ppo(**kw) -> PPOConfig:
    return PPOConfig(**{**OLD_PPO, **kw})


def old_lower(env: EnvConfig | None = None, agent: AgentConfig | None = None, ppo: PPOConfig | None = None,
              **kw) -> LowerConfig:
    return LowerConfig(env=old_env() if env is None else env, agent=old_agent() if agent is None else agent,
                       ppo=old_ppo() if ppo is None else ppo, **kw)
