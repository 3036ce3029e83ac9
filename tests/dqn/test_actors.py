import gymnasium as gym
import numpy as np
import pytest

from gossipdqn.config import ActorConfig
from gossipdqn.dqn.actors import Actors, ape_x_epsilons, linear_epsilon
from gossipdqn.dqn.envs import spec_of


def expected_transitions(length, n, gamma, terminate):
    """Hand-computed n-step transitions of one Countdown episode: (obs, R, next_obs, disc)."""
    rows = []
    for start in range(length):
        steps = range(start + 1, min(start + n, length) + 1)
        ret = sum(gamma**i * r for i, r in enumerate(steps))
        last = steps[-1]
        disc = 0.0 if (terminate and last == length) else gamma ** len(steps)
        rows.append((float(start), ret, float(last), disc))
    return rows


@pytest.mark.parametrize("terminate", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_nstep_transitions_across_episode_ends(terminate, n):
    length, gamma, num_envs, episodes = 5, 0.5, 2, 3
    env = gym.make_vec(
        "Countdown-v0", num_envs=num_envs, vectorization_mode="sync",
        length=length, terminate=terminate,
    )  # fmt: skip
    spec = spec_of(env)
    actors = Actors(env, spec, ActorConfig(), n_step=n, gamma=gamma, seed=0)
    got = []
    for _ in range(episodes * (length + 1)):
        t = actors.step(lambda obs: np.zeros((len(obs), 2))).transitions
        got += zip(t.obs[:, 0].tolist(), t.rewards.tolist(), t.next_obs[:, 0].tolist(),
                   t.discounts.tolist())  # fmt: skip
    expected = expected_transitions(length, n, gamma, terminate) * (num_envs * episodes)
    assert np.allclose(np.array(sorted(got)), np.array(sorted(expected)))
    assert actors.steps == num_envs * episodes * length  # reset steps are not env steps
    env.close()


def test_episode_returns_are_reported():
    env = gym.make_vec("Countdown-v0", num_envs=3, vectorization_mode="sync", length=4)
    actors = Actors(env, spec_of(env), ActorConfig(), n_step=1, gamma=0.9, seed=0)
    returns = []
    for _ in range(10):
        returns += actors.step(lambda obs: np.zeros((len(obs), 2))).episode_returns.tolist()
    assert returns == [10.0] * 6
    env.close()


def test_epsilon_schedules():
    cfg = ActorConfig(eps_start=1.0, eps_end=0.1, eps_decay_steps=100)
    assert [linear_epsilon(s, cfg) for s in (0, 50, 100, 1000)] == pytest.approx(
        [1, 0.55, 0.1, 0.1]
    )
    ladder = ape_x_epsilons(np.arange(8), 8, ActorConfig(ape_x_eps=0.4, ape_x_alpha=7.0))
    assert ladder[0] == pytest.approx(0.4) and ladder[-1] == pytest.approx(0.4**8)
    assert np.all(np.diff(ladder) < 0)


def test_the_nodes_of_a_run_step_envs_of_disjoint_seeds():
    # node r of a run is seeded run seed + r; its 8 envs must not replay a neighbour's episodes
    starts = []
    for node_seed in range(4):
        env = gym.make_vec("CartPole-v1", num_envs=8, vectorization_mode="sync")
        actors = Actors(env, spec_of(env), ActorConfig(), n_step=1, gamma=0.9, seed=node_seed)
        starts.append(actors.obs.copy())
        env.close()
    rows = np.concatenate(starts)
    assert len(np.unique(rows, axis=0)) == len(rows), "two envs of the swarm start alike"
