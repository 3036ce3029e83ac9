"""Actors: epsilon-greedy action selection over a vector of environments, n-step transitions."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from gossipdqn.config import ActorConfig
from gossipdqn.dqn.envs import LIFE_LOST, first_env_seed
from gossipdqn.types import EnvSpec, Transitions, VectorStep

QFunction = Callable[[np.ndarray], np.ndarray]
"""Maps a batch of observations to a (batch, actions) array of Q-values."""


def linear_epsilon(step: int, cfg: ActorConfig) -> float:
    """Epsilon decayed linearly from eps_start to eps_end over eps_decay_steps env steps."""
    frac = min(1.0, step / cfg.eps_decay_steps)
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


def ape_x_epsilons(indices: np.ndarray, total: int, cfg: ActorConfig) -> np.ndarray:
    """Ape-X ladder eps_i = eps^(1 + alpha * i / (N - 1)) for actor indices i among N."""
    spread = indices / max(1, total - 1)
    return cfg.ape_x_eps ** (1.0 + cfg.ape_x_alpha * spread)


class NStepAccumulator:
    """Turns per-step vector-env output into n-step transitions, without a per-env loop.

    Each env keeps up to n pending starts in a ring of slots; every valid step adds the reward
    to each pending start, and a start is emitted when it spans n steps or its episode ends.
    A terminated episode stores discount 0; a truncated one bootstraps from its final obs.
    """

    def __init__(self, num_envs: int, n: int, gamma: float, spec: EnvSpec) -> None:
        self.n, self.gamma = n, gamma
        self.obs = np.zeros((num_envs, n, *spec.obs_shape), dtype=spec.obs_dtype)
        self.actions = np.zeros((num_envs, n), dtype=np.int64)
        self.returns = np.zeros((num_envs, n), dtype=np.float64)
        self.discounts = np.ones((num_envs, n), dtype=np.float64)
        self.lengths = np.zeros((num_envs, n), dtype=np.int64)
        self.active = np.zeros((num_envs, n), dtype=bool)
        self.next_slot = np.zeros(num_envs, dtype=np.int64)

    def push(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> Transitions:
        """Add one vector step; `valid` is False for envs whose step only reset them."""
        rows = np.flatnonzero(valid)
        slots = self.next_slot[rows]
        self.obs[rows, slots] = obs[rows]
        self.actions[rows, slots] = actions[rows]
        self.returns[rows, slots] = 0.0
        self.discounts[rows, slots] = 1.0
        self.lengths[rows, slots] = 0
        self.active[rows, slots] = True
        self.next_slot[rows] = (slots + 1) % self.n

        live = self.active & valid[:, None]
        self.returns += np.where(live, self.discounts * rewards[:, None], 0.0)
        self.discounts = np.where(live, self.discounts * self.gamma, self.discounts)
        self.lengths += live

        ended = (terminated | truncated) & valid
        emit = live & ((self.lengths >= self.n) | ended[:, None])
        env_idx, slot_idx = np.nonzero(emit)
        self.active[emit] = False
        self.next_slot[ended] = 0
        bootstrap = 1.0 - terminated[env_idx].astype(np.float64)
        return Transitions(
            self.obs[env_idx, slot_idx],
            self.actions[env_idx, slot_idx],
            self.returns[env_idx, slot_idx].astype(np.float32),
            next_obs[env_idx],
            (self.discounts[env_idx, slot_idx] * bootstrap).astype(np.float32),
        )


class ActorStep(NamedTuple):
    """What one vector step produced: transitions, the episodes it finished, the raw step."""

    transitions: Transitions
    env_steps: int
    episode_returns: np.ndarray
    episode_lengths: np.ndarray
    step: VectorStep


class Actors:
    """Steps a vector env with an epsilon-greedy policy and emits n-step transitions."""

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        spec: EnvSpec,
        cfg: ActorConfig,
        *,
        n_step: int,
        gamma: float,
        seed: int,
        actor_offset: int = 0,
        total_actors: int | None = None,
    ) -> None:
        self.env, self.spec, self.cfg = env, spec, cfg
        self.num_envs = env.num_envs
        self.rng = np.random.default_rng(seed)
        self.nstep = NStepAccumulator(self.num_envs, n_step, gamma, spec)
        self.obs, _ = env.reset(seed=first_env_seed(seed))
        self.reset_pending = np.zeros(self.num_envs, dtype=bool)
        self.episode_return = np.zeros(self.num_envs)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)
        self.steps = 0
        total = total_actors or self.num_envs
        indices = actor_offset + np.arange(self.num_envs)
        self.ladder = ape_x_epsilons(indices, total, cfg) if cfg.ape_x else None

    def epsilon(self) -> float | np.ndarray:
        """The current exploration rate: one value, or one per env with the Ape-X ladder."""
        return self.ladder if self.ladder is not None else linear_epsilon(self.steps, self.cfg)

    def step(self, q_values: QFunction) -> ActorStep:
        """Act in every env once and collect what came of it."""
        explore = self.rng.random(self.num_envs) < self.epsilon()
        actions = q_values(self.obs).argmax(axis=1)
        actions = np.where(
            explore, self.rng.integers(0, self.spec.n_actions, self.num_envs), actions
        )
        next_obs, rewards, terminated, truncated, info = self.env.step(actions)
        valid = ~self.reset_pending
        transitions = self.nstep.push(
            self.obs, actions, rewards, next_obs, terminated, truncated, valid
        )
        self.episode_return += np.where(valid, rewards, 0.0)
        self.episode_length += valid
        # a lost Atari life is terminal for the n-step returns, but the game goes on unreset
        resets = (terminated | truncated) & ~np.asarray(info.get(LIFE_LOST, False), dtype=bool)
        ended = resets & valid
        returns, lengths = self.episode_return[ended], self.episode_length[ended]
        self.episode_return[ended] = 0.0
        self.episode_length[ended] = 0
        self.reset_pending = resets
        step = VectorStep(self.obs, actions, rewards, next_obs, terminated, truncated, valid)
        self.obs = next_obs
        n_valid = int(valid.sum())
        self.steps += n_valid
        return ActorStep(transitions, n_valid, returns, lengths, step)

    def close(self) -> None:
        self.env.close()
