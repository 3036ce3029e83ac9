import numpy as np
import pytest

from gossipdqn.config import ConfigError, config_from_dict
from gossipdqn.dqn.replay import ReplayBuffer, SumTree
from gossipdqn.types import Transitions


def batch(ids, obs_dtype=np.float32):
    ids = np.asarray(ids)
    obs = np.stack([ids, ids]).T.astype(obs_dtype)
    return Transitions(
        obs, ids.astype(np.int64), ids.astype(np.float32), obs + 1, np.ones(len(ids), np.float32)
    )


@pytest.mark.parametrize("prioritized", [False, True])
def test_contents_after_wraparound(prioritized):
    replay = ReplayBuffer(5, (2,), np.float32, prioritized=prioritized)
    replay.add(batch([0, 1, 2]))
    slots = replay.add(batch([3, 4, 5, 6]))
    assert slots.tolist() == [3, 4, 0, 1]
    assert replay.actions.tolist() == [5, 6, 2, 3, 4]
    assert replay.obs[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert replay.next_obs[:, 1].tolist() == [6, 7, 3, 4, 5]
    assert (len(replay), replay.pos, replay.added) == (5, 2, 7)
    assert replay.latest(3).actions.tolist() == [4, 5, 6]


def test_batch_larger_than_capacity_keeps_the_newest():
    replay = ReplayBuffer(3, (2,), np.float32)
    replay.add(batch(range(7)))
    assert sorted(replay.actions.tolist()) == [4, 5, 6]
    assert replay.latest(3).actions.tolist() == [4, 5, 6]


def test_uint8_observations_stay_uint8():
    replay = ReplayBuffer(4, (2,), np.uint8)
    replay.add(batch([1, 2], obs_dtype=np.uint8))
    assert replay.obs.dtype == np.uint8 and replay.sample(3).obs.dtype == np.uint8


def test_uniform_sample_only_filled_slots():
    replay = ReplayBuffer(100, (2,), np.float32, seed=1)
    replay.add(batch(range(10)))
    sample = replay.sample(1000)
    assert set(sample.actions.tolist()) == set(range(10))
    assert np.array_equal(sample.obs[:, 0], sample.actions.astype(np.float32))
    assert np.all(sample.weights == 1.0)


def test_sum_tree_sums_and_search():
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 0.0]))
    assert tree.total == 10.0
    found = tree.find(np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99]))
    assert found.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_prioritized_sampling_is_proportional():
    replay = ReplayBuffer(8, (2,), np.float32, prioritized=True, alpha=1.0, seed=3)
    replay.add(batch(range(4)))
    replay.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    counts = np.zeros(4)
    for _ in range(200):
        counts += np.bincount(replay.sample(100).indices, minlength=4)
    freq = counts / counts.sum()
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / 10.0
    assert np.allclose(freq, expected, atol=0.01)


def test_importance_weights():
    replay = ReplayBuffer(4, (2,), np.float32, prioritized=True, alpha=1.0, priority_eps=1e-9)
    replay.add(batch(range(4)))
    replay.update_priorities(np.arange(4), np.array([1.0, 1.0, 1.0, 5.0]))
    sample = replay.sample(64, beta=0.5)
    probs = np.array([1, 1, 1, 5]) / 8.0
    raw = (4 * probs) ** -0.5
    assert np.allclose(sample.weights, raw[sample.indices] / raw[sample.indices].max())


@pytest.mark.parametrize("prioritized", [False, True])
def test_state_dict_round_trip(prioritized):
    a = ReplayBuffer(6, (2,), np.float32, prioritized=prioritized, seed=5)
    a.add(batch(range(9)))
    a.update_priorities(np.arange(3), np.array([3.0, 1.0, 2.0]))
    b = ReplayBuffer(6, (2,), np.float32, prioritized=prioritized, seed=99)
    b.load_state_dict(a.state_dict())
    sa, sb = a.sample(16, 0.5), b.sample(16, 0.5)
    for x, y in zip(sa, sb):
        assert np.array_equal(x, y)
    assert (a.pos, a.size, a.added) == (b.pos, b.size, b.added)


def test_priorities_skip_slots_written_since_the_sample():
    """A prefetched batch's slots overwritten before its update keep their new max priority."""
    replay = ReplayBuffer(8, (2,), np.float32, prioritized=True, alpha=1.0, priority_eps=1e-9)
    replay.add(batch(range(8)))
    replay.update_priorities(np.arange(8), np.full(8, 2.0))
    sampled = replay.sample(8)
    replay.update_priorities(np.arange(8), np.full(8, 0.5))  # other batches updated meanwhile
    slots = replay.add(batch([8, 9, 10]))  # three new transitions, at max priority 2
    replay.update_priorities(sampled.indices, np.full(8, 7.0), sampled.sampled_at)
    priorities = replay.tree.get(np.arange(8))
    assert np.allclose(priorities[slots], 2.0)
    kept = np.setdiff1d(sampled.indices, slots)
    assert len(kept) > 0 and np.allclose(priorities[kept], 7.0)


def test_a_priority_eps_of_zero_is_refused():
    with pytest.raises(ConfigError, match="replay.priority_eps: expected a value >= 1e-12"):
        config_from_dict({"replay": {"priority_eps": 0.0}})
    with pytest.raises(ValueError, match="priority_eps: expected a value > 0"):
        ReplayBuffer(4, (2,), np.float32, prioritized=True, priority_eps=0.0)


def test_loaded_zero_priorities_still_give_finite_weights():
    replay = ReplayBuffer(4, (2,), np.float32, prioritized=True)
    replay.add(batch(range(4)))
    state = replay.state_dict() | {"priorities": np.zeros(4), "max_priority": 0.0}
    restored = ReplayBuffer(4, (2,), np.float32, prioritized=True)
    restored.load_state_dict(state)
    sample = restored.sample(16, beta=0.4)
    assert np.isfinite(sample.weights).all() and np.allclose(sample.weights, 1.0)


def test_sum_tree_never_finds_a_zero_leaf():
    """Rounding can leave a value at the end of its interval: it must not fall to a zero leaf."""
    priorities = np.array([0.7955234726948781, 0, 546.2117375542567, 0, 0.0954106398771708,
                           599.2218043386945, 633.1918418312509, 0])  # fmt: skip
    tree = SumTree(8)
    tree.set(np.arange(8), priorities)
    edges = np.cumsum(priorities)
    values = np.concatenate([edges, np.nextafter(edges, 0)])
    found = tree.find(values[values < tree.total])
    assert (priorities[found] > 0).all(), found


def test_a_td_error_that_is_not_finite_is_refused_and_the_tree_keeps_its_priorities():
    replay = ReplayBuffer(4, (2,), np.float32, prioritized=True, alpha=1.0, priority_eps=1e-9)
    replay.add(batch(range(4)))
    replay.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match=r"td_errors: 1 of 4 are not finite \(nan\)"):
        replay.update_priorities(np.arange(4), np.array([1.0, np.nan, 3.0, 4.0]))
    assert np.allclose(replay.tree.get(np.arange(4)), [1.0, 2.0, 3.0, 4.0])
    assert replay.max_priority == pytest.approx(4.0)
    assert np.isfinite(replay.sample(16, beta=0.4).weights).all()
