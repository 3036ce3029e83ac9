"""Gymnasium environments: vectorized training envs and their shapes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from gossipdqn.config import EnvConfig
from gossipdqn.types import EnvSpec


class EnvError(ValueError):
    """The environment cannot be used by a DQN node; the message says why."""


def _make_kwargs(cfg: EnvConfig) -> dict:
    return {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps else {}


def make_vector_env(cfg: EnvConfig, num_envs: int | None = None) -> gym.vector.VectorEnv:
    """`num_envs` copies of `cfg.id`, in-process (sync) or in subprocesses (async)."""
    n = num_envs or cfg.num_envs
    try:
        env = gym.make_vec(
            cfg.id, num_envs=n, vectorization_mode=cfg.vectorization, **_make_kwargs(cfg)
        )
    except gym.error.Error as e:
        raise EnvError(f"env.id: cannot make {cfg.id!r} ({e})") from None
    spec_of(env)
    return env


def spec_of(env: gym.vector.VectorEnv) -> EnvSpec:
    """Observation shape and dtype and action count; rejects what a DQN cannot act in."""
    space, obs = env.single_action_space, env.single_observation_space
    if not isinstance(space, gym.spaces.Discrete):
        raise EnvError(f"env.id: DQN needs a Discrete action space, got {space}")
    if not isinstance(obs, gym.spaces.Box):
        raise EnvError(f"env.id: expected a Box observation space, got {obs}")
    return EnvSpec(tuple(obs.shape), np.dtype(obs.dtype), int(space.n))
