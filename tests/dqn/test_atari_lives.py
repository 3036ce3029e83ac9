"""Atari as DeepMind defined it: a lost life is terminal for the learner and the game goes on."""

import numpy as np
import pytest

from gossipdqn.config import ActorConfig, EnvConfig
from gossipdqn.dqn.actors import Actors
from gossipdqn.dqn.envs import make_vector_env, spec_of

pytest.importorskip("ale_py", reason="ale-py (with its ROMs) is not installed")
pytestmark = pytest.mark.timeout(60)

BREAKOUT = EnvConfig(id="ALE/Breakout-v5", num_envs=2)
LIVES = 5  # Breakout's lives at the start of a game
STEPS = 300  # random play loses a Breakout life every ~25 steps: two or more games per env


def play(env, steps: int) -> list[tuple]:
    """Random actions: (obs, next_obs, terminated, truncated, lives after) of every step."""
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(steps):
        actions = rng.integers(0, env.single_action_space.n, env.num_envs)
        next_obs, _, terminated, truncated, info = env.step(actions)
        rows.append((obs, next_obs, terminated, truncated, np.array(info["lives"])))
        obs = next_obs
    return rows


def test_a_lost_life_continues_the_same_game():
    env = make_vector_env(BREAKOUT)
    try:
        rows = play(env, STEPS)
    finally:
        env.close()
    lost = resets = 0
    for (_, last, terminated, _, lives), (_, following, _, _, then) in zip(rows, rows[1:]):
        for i in np.flatnonzero(terminated):
            if lives[i] > 0:  # a life lost: same game, frames go on, one life fewer
                lost += 1
                assert then[i] == lives[i], "a lost life reset the game"
                assert np.array_equal(following[i, :-1], last[i, 1:])
            else:  # the game over resets: a full set of lives, a fresh stack padded with zeros
                resets += 1
                assert then[i] == LIVES and not following[i, :-1].any()
                assert not np.array_equal(following[i, :-1], last[i, 1:])
    assert resets >= 2 and lost >= 4 * resets
    for i in range(BREAKOUT.num_envs):  # every game counts its lives down to 0, one per terminal
        at_ends = [int(r[4][i]) for r in rows if r[2][i]]
        assert at_ends == [LIVES - 1 - k % LIVES for k in range(len(at_ends))]


def game_outcomes(steps: list) -> tuple[list[float], list[int], int]:
    """Per game (reset to reset): its return and length, and the terminal n-step rows expected."""
    returns, lengths, terminal_rows, n = [], [], 0, 3
    for i in range(BREAKOUT.num_envs):
        total, length, since_terminal = 0.0, 0, 0
        for t, s in enumerate(steps):
            if not s.valid[i]:
                continue
            total, length, since_terminal = total + s.rewards[i], length + 1, since_terminal + 1
            if s.terminated[i]:
                terminal_rows, since_terminal = terminal_rows + min(n, since_terminal), 0
            if t + 1 < len(steps) and not steps[t + 1].valid[i]:
                returns, lengths = returns + [total], lengths + [length]
                total, length = 0.0, 0
    return sorted(returns), sorted(lengths), terminal_rows


def test_the_learner_sees_a_lost_life_as_terminal_and_episodes_are_games():
    env = make_vector_env(BREAKOUT)
    cfg = ActorConfig(eps_start=1.0, eps_end=1.0)
    actors = Actors(env, spec_of(env), cfg, n_step=3, gamma=0.9, seed=0)
    try:
        out = [actors.step(lambda obs: np.zeros((len(obs), 4))) for _ in range(STEPS)]
    finally:
        actors.close()
    steps = [o.step for o in out]
    terminals = sum(int(s.terminated.sum()) for s in steps)
    returns, lengths, terminal_rows = game_outcomes(steps)
    assert len(returns) >= 2 and terminals >= LIVES * len(returns)
    reported = out[:-1]  # a game over at the last step shows only in the step after it
    assert sorted(r for o in reported for r in o.episode_returns.tolist()) == returns
    assert sorted(n for o in reported for n in o.episode_lengths.tolist()) == lengths
    assert sum(int((o.transitions.discounts == 0).sum()) for o in out) == terminal_rows
    for s, following in zip(steps, steps[1:]):
        assert np.array_equal(following.obs, s.next_obs)


def test_an_evaluation_plays_whole_games():
    env = make_vector_env(BREAKOUT, training=False)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    seen = [{LIVES} for _ in range(BREAKOUT.num_envs)]  # lives counts until each env's first end
    running = np.ones(BREAKOUT.num_envs, dtype=bool)
    try:
        for _ in range(STEPS):
            actions = rng.integers(0, env.single_action_space.n, env.num_envs)
            _, _, terminated, truncated, info = env.step(actions)
            for i in np.flatnonzero(running):
                seen[i].add(int(info["lives"][i]))
                assert not terminated[i] or info["lives"][i] == 0, "an evaluation ended at a life"
            running &= ~(terminated | truncated)
            if not running.any():
                break
    finally:
        env.close()
    assert not running.any(), "no evaluation game ended"
    assert seen == [set(range(LIVES + 1))] * BREAKOUT.num_envs
