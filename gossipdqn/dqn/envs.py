"""Gymnasium environments: vectorized training envs (classic, MinAtar, Atari) and their shapes."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

import gymnasium as gym
import numpy as np

from gossipdqn.config import EnvConfig
from gossipdqn.types import EnvSpec

ATARI_MAX_FRAMES = 108_000
"""The standard episode cap: 27k agent steps of 4 frames (30 minutes of play)."""
LIFE_LOST = "life_lost"
"""Step info key (training Atari envs): a life was lost and the game goes on, no reset follows."""


class EnvError(ValueError):
    """The environment cannot be used by a DQN node; the message says why."""


def _make_kwargs(cfg: EnvConfig) -> dict:
    return {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps else {}


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def atari_game(env_id: str) -> str:
    """The ROM name of an `ALE/Name-vN` id: `ALE/SpaceInvaders-v5` is `space_invaders`."""
    name = env_id.removeprefix("ALE/").split("-")[0]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _make_atari(cfg: EnvConfig, n: int, training: bool) -> gym.vector.VectorEnv:
    """ale-py's native vector env with the DQN preprocessing done in C++ threads."""
    try:
        from ale_py.vector_env import AtariVectorEnv
    except ImportError:
        raise EnvError(
            f"env.id: {cfg.id!r} needs ale-py; install it with `pip install gossipdqn[atari]`"
        ) from None
    frames = cfg.max_episode_steps * 4 if cfg.max_episode_steps else ATARI_MAX_FRAMES
    try:
        env = AtariVectorEnv(
            atari_game(cfg.id), n, num_threads=cfg.threads, noop_max=cfg.noop_max,
            frameskip=4, maxpool=True, img_height=84, img_width=84, grayscale=True, stack_num=4,
            episodic_life=False, reward_clipping=cfg.clip_rewards and training,
            max_num_frames_per_episode=frames, repeat_action_probability=0.0,
        )  # fmt: skip
    except (AssertionError, RuntimeError, ValueError) as e:  # ale-py asserts on bad ROM names
        raise EnvError(f"env.id: cannot make {cfg.id!r} ({e})") from None
    return EpisodicLife(env) if cfg.episodic_life and training else env


class EpisodicLife(gym.vector.VectorWrapper):
    """DeepMind's episodic life: a lost life is terminal for the learner and the game goes on.

    ale-py's `episodic_life` resets the whole game at every lost life, and its `life_loss_info`
    sets `terminated` at a lost life without telling it from a game over (which resets). Here
    ale-py's `terminated` stays the game over; a drop of `info["lives"]` also sets `terminated`,
    and `info[LIFE_LOST]` marks the envs whose game goes on.
    """

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.lives = np.zeros(env.num_envs, dtype=np.int64)

    def reset(self, **kwargs: object) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(**kwargs)
        self.lives = np.array(info["lives"], dtype=np.int64)
        return obs, info

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        lives = np.array(info["lives"], dtype=np.int64)
        lost, self.lives = lives < self.lives, lives
        info[LIFE_LOST] = lost & ~(terminated | truncated)
        return obs, rewards, terminated | lost, truncated, info


def _register_minatar(env_id: str) -> None:
    try:
        import minatar.gym
    except ImportError:
        raise EnvError(
            f"env.id: {env_id!r} needs MinAtar; install it with `pip install gossipdqn[minatar]`"
        ) from None
    if env_id not in gym.registry:
        minatar.gym.register_envs()


def import_env_modules(modules: Sequence[str]) -> None:
    """Import each module of `env.imports` (they register gymnasium ids); EnvError if one fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a user's module may fail in any way while importing
            raise EnvError(
                f"env.imports: cannot import {name!r} ({type(e).__name__}: {e}); expected a "
                "module on this machine's python path (PYTHONPATH) that registers the env"
            ) from None


def first_env_seed(seed: int) -> int:
    """The seed of the first of a vector env's envs (the others follow it) for an actor set
    seeded `seed`. Drawn through `SeedSequence`: actor sets seeded seed, seed + 1, ... (the nodes
    of a run) then step envs of disjoint seeds, where seeding each at `seed` would give them all
    but one env in common."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0] % 2**30)


def make_vector_env(
    cfg: EnvConfig, num_envs: int | None = None, *, training: bool = True
) -> gym.vector.VectorEnv:
    """`num_envs` copies of `cfg.id`; evaluation (`training=False`) sees whole, unclipped games."""
    n = num_envs or cfg.num_envs
    import_env_modules(cfg.imports)
    if is_atari(cfg.id):
        env = _make_atari(cfg, n, training)
    else:
        if cfg.id.startswith("MinAtar/"):
            _register_minatar(cfg.id)
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


def is_frame_stack(spec: EnvSpec) -> bool:
    """Stacked image frames (stack, height, width) of uint8, as the Atari envs give."""
    return spec.obs_dtype == np.uint8 and len(spec.obs_shape) == 3 and spec.obs_shape[0] <= 8
