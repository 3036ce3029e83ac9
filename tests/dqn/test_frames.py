"""Frame replay: stacks rebuilt from frames stored once equal the stacks the env gave."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import FrameStackObservation

from gossipdqn.config import ActorConfig, EnvConfig
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.frame_replay import FrameReplay
from gossipdqn.dqn.replay import ReplayBuffer


class FlickerEnv(gym.Env):
    """Random non-zero 6x5 frames; episodes of random length ending terminated or truncated."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0, 255, shape=(6, 5), dtype=np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def _frame(self) -> np.ndarray:
        return self.np_random.integers(1, 256, (6, 5), dtype=np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.integers(1, 9))
        return self._frame(), {}

    def step(self, action):
        self.left -= 1
        ended = self.left <= 0
        cut = bool(self.np_random.random() < 0.3)
        return self._frame(), float(action), ended and not cut, ended and cut, {}


gym.register("Flicker-v0", entry_point=FlickerEnv)


def flicker_env(padding="zero"):
    """The naive frame stack: gymnasium's own wrapper, padded with zeros or the first frame."""
    return gym.make_vec(
        "Flicker-v0", num_envs=3, vectorization_mode="sync",
        wrappers=[lambda env: FrameStackObservation(env, 4, padding_type=padding)],
    )  # fmt: skip


def fill_both(env, steps, capacity, *, n_step=3, prioritized=False):
    """Feed the same actor steps to a whole-stack replay and a frame replay."""
    spec = spec_of(env)
    actors = Actors(env, spec, ActorConfig(), n_step=n_step, gamma=0.9, seed=0)
    plain = ReplayBuffer(capacity, spec.obs_shape, spec.obs_dtype, prioritized=prioritized)
    frames = FrameReplay(
        capacity, spec.obs_shape, n_step=n_step, gamma=0.9, prioritized=prioritized, seed=1
    )
    rng = np.random.default_rng(0)
    for _ in range(steps):
        out = actors.step(lambda obs: rng.random((len(obs), spec.n_actions)))
        slots = plain.add(out.transitions)
        assert np.array_equal(frames.add_steps(0, out.step), slots)
    env.close()
    return plain, frames


@pytest.mark.parametrize("padding", ["zero", "reset"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_rebuilt_stacks_equal_naive_stacks_across_episode_starts(n_step, padding):
    plain, frames = fill_both(flicker_env(padding), 200, 10_000, n_step=n_step)
    got, want = frames.latest(len(plain)), plain.latest(len(plain))
    for name in ("obs", "next_obs", "actions", "rewards", "discounts"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert len(frames) == len(plain) > 400
    if padding == "zero":  # one frame per step plus one per episode start (~4.5 steps here)
        assert frames.written < len(plain) * 1.3


@pytest.mark.parametrize("prioritized", [False, True])
def test_samples_after_wraparound_equal_the_whole_stack_replay(prioritized):
    plain, frames = fill_both(flicker_env(), 300, 200, prioritized=prioritized)
    for _ in range(5):
        batch = frames.sample(64)
        assert np.array_equal(batch.obs, plain.obs[batch.indices])
        assert np.array_equal(batch.next_obs, plain.next_obs[batch.indices])
        assert np.array_equal(batch.rewards, plain.rewards[batch.indices])
        frames.update_priorities(batch.indices, np.ones(64))


def test_transitions_from_peers_round_trip():
    plain, _ = fill_both(flicker_env(), 40, 1000)
    shared = plain.latest(50)
    frames = FrameReplay(1000, plain.obs.shape[1:], n_step=3, gamma=0.9)
    frames.add(shared)
    got = frames.latest(50)
    assert np.array_equal(got.obs, shared.obs) and np.array_equal(got.next_obs, shared.next_obs)
    state = frames.state_dict()
    restored = FrameReplay(1000, plain.obs.shape[1:], n_step=3, gamma=0.9)
    restored.load_state_dict(state)
    assert np.array_equal(restored.latest(50).next_obs, shared.next_obs)


def test_atari_stacks_equal_the_env_stacks():
    pytest.importorskip("ale_py")
    env = make_vector_env(EnvConfig(id="ALE/Breakout-v5", num_envs=2))
    plain, frames = fill_both(env, 300, 2000)
    got, want = frames.latest(len(plain)), plain.latest(len(plain))
    assert np.array_equal(got.obs, want.obs) and np.array_equal(got.next_obs, want.next_obs)
    assert frames.frames.nbytes < plain.obs.nbytes / 3.5
