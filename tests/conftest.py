"""Shared test fixtures: a tiny deterministic environment registered with gymnasium."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest


class CountdownEnv(gym.Env):
    """obs = [steps taken]; reward = steps taken after the step; ends after `length` steps.

    `terminate=True` ends with `terminated`, otherwise with `truncated` (a time limit).
    """

    def __init__(self, length: int = 5, terminate: bool = True) -> None:
        self.length, self.terminate = length, terminate
        self.observation_space = gym.spaces.Box(0, 1000, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        ended = self.t >= self.length
        obs = np.array([float(self.t)], dtype=np.float32)
        return obs, float(self.t), ended and self.terminate, ended and not self.terminate, {}


gym.register("Countdown-v0", entry_point=CountdownEnv)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Settings for a CartPole run that finishes in seconds and still exercises every part."""
    return [
        "train.total_steps=1200",
        "train.log_every_steps=200",
        "learner.learning_starts=200",
        "learner.batch_size=32",
        "eval.every_steps=400",
        "eval.episodes=2",
        "eval.final_episodes=3",
        "checkpoint.every_steps=600",
        "env.num_envs=4",
        "network.hidden=[32,32]",
    ]
