"""Plain data that flows between the parts of a node."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Transitions(NamedTuple):
    """A batch of n-step transitions; `discounts` is gamma^k, or 0 where the episode terminated."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.actions.shape[0])


class VectorStep(NamedTuple):
    """One step of a vector env as it happened; `valid` is False where the step only reset."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray


class SampledBatch(NamedTuple):
    """A minibatch from replay, with importance weights and the slots it came from.

    `sampled_at` is the replay's write count when sampled: `update_priorities` leaves alone the
    slots written since. Both stay last (`Learner.to_device` keeps them on the host).
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    discounts: np.ndarray
    weights: np.ndarray
    sampled_at: int
    indices: np.ndarray


class EnvSpec(NamedTuple):
    """What the networks and replay need to know about an environment."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    n_actions: int


class EvalResult(NamedTuple):
    """A greedy evaluation: returns, episode lengths, and which episodes the time limit ended."""

    mean: float
    std: float
    returns: tuple[float, ...]
    lengths: tuple[int, ...] = ()
    truncated: tuple[bool, ...] = ()
