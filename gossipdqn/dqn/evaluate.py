"""Greedy evaluation of a Q-function on environments apart from the training ones."""

from __future__ import annotations

import numpy as np

from gossipdqn.config import EnvConfig
from gossipdqn.dqn.actors import QFunction
from gossipdqn.dqn.envs import first_env_seed, make_vector_env
from gossipdqn.types import EvalResult


def evaluate(
    q_values: QFunction, env_cfg: EnvConfig, episodes: int, *, seed: int, eps: float = 0.0
) -> EvalResult:
    """Run one episode in each of `episodes` envs with an eps-greedy policy; their returns,
    lengths, and which of them the time limit ended."""
    env = make_vector_env(env_cfg, num_envs=episodes, training=False)
    rng = np.random.default_rng(seed)
    try:
        obs, _ = env.reset(seed=first_env_seed(seed))
        totals = np.zeros(episodes)
        lengths = np.zeros(episodes, dtype=np.int64)
        cut = np.zeros(episodes, dtype=bool)
        running = np.ones(episodes, dtype=bool)
        n_actions = int(env.single_action_space.n)
        while running.any():
            actions = q_values(obs).argmax(axis=1)
            explore = rng.random(episodes) < eps
            actions = np.where(explore, rng.integers(0, n_actions, episodes), actions)
            obs, rewards, terminated, truncated, _ = env.step(actions)
            totals += np.where(running, rewards, 0.0)
            lengths += running
            cut |= running & truncated & ~terminated
            running &= ~(terminated | truncated)
    finally:
        env.close()
    return EvalResult(
        float(totals.mean()), float(totals.std()), tuple(totals.tolist()),
        tuple(lengths.tolist()), tuple(cut.tolist()),
    )  # fmt: skip
