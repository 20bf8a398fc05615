"""The reward source of an environment (``rlhfkit.envs:env_reward``, also importable from here)."""

from __future__ import annotations


def env_reward(prompts: list[str], responses: list[str], env_reward: list[float]) -> list[float]:
    """The reward source of an environment: the sum of its step rewards over the episode (a
    column the multi-turn rollout fills: ``MultiTurn.provides``). Combine it with other sources
    in ``rewards:``."""
    return list(env_reward)
