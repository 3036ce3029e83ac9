"""A greedy evaluation reports each episode's return, length and whether the time limit ended it."""

import numpy as np

from gossipdqn.config import EnvConfig
from gossipdqn.dqn.evaluate import evaluate

CARTPOLE_20 = EnvConfig(id="CartPole-v1", num_envs=1, max_episode_steps=20)


def push_towards_the_lean(obs: np.ndarray) -> np.ndarray:
    """Q-values of a policy that keeps CartPole's pole up for far more than 20 steps."""
    right = obs[:, 2] > 0
    return np.stack([~right, right], axis=1).astype(np.float32)


def always_left(obs: np.ndarray) -> np.ndarray:
    return np.tile(np.array([1.0, 0.0], dtype=np.float32), (len(obs), 1))


def test_an_evaluation_tells_the_time_limit_from_the_end_of_the_episode():
    falls = evaluate(always_left, CARTPOLE_20, 5, seed=0)
    assert falls.truncated == (False,) * 5
    assert all(length < 20 for length in falls.lengths)
    assert falls.returns == tuple(float(n) for n in falls.lengths)  # CartPole pays 1 a step

    balances = evaluate(push_towards_the_lean, CARTPOLE_20, 5, seed=0)
    assert balances.truncated == (True,) * 5
    assert balances.lengths == (20,) * 5
