"""Peer graphs: degrees, reachability within the diameter, determinism, argument checks."""

import math

import numpy as np
import pytest

from gossipdqn.gossip.topology import (
    TOPOLOGIES,
    diameter,
    in_peers,
    mixing_matrix,
    out_peers,
    peer_table,
)

WORLDS = [2, 3, 5, 8, 16]


def _expected_degree(topology: str, world: int) -> int:
    return {"ring": 1, "exponential": 1, "random_regular": min(2, world - 1)}.get(
        topology, world - 1
    )


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_node_reaches_every_other_within_diameter(topology: str, world: int) -> None:
    rounds = diameter(topology, world, seed=3)
    reached = [{i} for i in range(world)]  # reached[i]: nodes that know node i's round-0 value
    for round_ in range(rounds):
        for known in reached:
            known |= {p for j in list(known) for p in out_peers(topology, j, world, round_, seed=3)}
    assert all(known == set(range(world)) for known in reached)
    if rounds > 1:  # one round fewer is not enough, so the diameter is the least such count
        with pytest.raises(RuntimeError):
            diameter(topology, world, seed=3, rounds=rounds - 1)


@pytest.mark.parametrize("world", WORLDS)
def test_known_diameters(world: int) -> None:
    assert diameter("ring", world) == world - 1
    assert diameter("complete", world) == 1
    if world & (world - 1) == 0:
        assert diameter("exponential", world) == math.ceil(math.log2(world))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_degrees_and_no_self_loops(topology: str, world: int) -> None:
    degree = _expected_degree(topology, world)
    for round_ in range(5):
        outs = [out_peers(topology, r, world, round_, seed=1) for r in range(world)]
        ins = [in_peers(topology, r, world, round_, seed=1) for r in range(world)]
        for rank in range(world):
            assert len(outs[rank]) == len(set(outs[rank])) == degree
            assert rank not in outs[rank]
            assert len(ins[rank]) == degree
            assert ins[rank] == sorted(j for j in range(world) if rank in outs[j])


def test_ring_and_exponential_peers_by_hand() -> None:
    assert [out_peers("ring", r, 5, 7) for r in range(5)] == [[1], [2], [3], [4], [0]]
    assert in_peers("ring", 0, 5, 0) == [4]
    # world 8: period 3, shifts 1, 2, 4, 1, ...
    assert [out_peers("exponential", 6, 8, r)[0] for r in range(4)] == [7, 0, 2, 7]
    assert sorted(out_peers("complete", 2, 4, 9)) == [0, 1, 3]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_random_regular_exact_degree_deterministic_and_varying(k: int) -> None:
    world = 8
    tables = [peer_table("random_regular", world, r, k=k, seed=5) for r in range(6)]
    for table in tables:
        assert table.shape == (world, k)
        assert np.all(np.bincount(table.ravel(), minlength=world) == k)
        assert not np.any(table == np.arange(world)[:, None])
    again = peer_table("random_regular", world, 2, k=k, seed=5)
    np.testing.assert_array_equal(tables[2], again)
    if k < world - 1:
        assert any(not np.array_equal(tables[0], t) for t in tables[1:])
        other_seed = [peer_table("random_regular", world, r, k=k, seed=6) for r in range(6)]
        assert any(not np.array_equal(a, b) for a, b in zip(tables, other_seed))


@pytest.mark.parametrize("world", [1, 2, 5, 8])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_mixing_matrices_are_stochastic(topology: str, world: int) -> None:
    for round_ in range(3):
        push = mixing_matrix(topology, world, round_, seed=2)
        np.testing.assert_allclose(push.sum(axis=0), 1.0)
        assert np.all(push >= 0)
        pair = mixing_matrix(topology, world, round_, seed=2, scheme="pairwise")
        np.testing.assert_allclose(pair, pair.T)
        np.testing.assert_allclose(pair.sum(axis=0), 1.0)
        assert np.all(pair >= 0)


def test_push_sum_matrix_by_hand() -> None:
    expected = np.array([[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    np.testing.assert_allclose(mixing_matrix("ring", 3, 0), expected)
    np.testing.assert_allclose(mixing_matrix("complete", 3, 0), np.full((3, 3), 1 / 3))


def test_world_of_one_has_no_peers() -> None:
    for topology in TOPOLOGIES:
        assert out_peers(topology, 0, 1, 4) == []
        assert in_peers(topology, 0, 1, 4) == []
        assert diameter(topology, 1) == 0
        np.testing.assert_allclose(mixing_matrix(topology, 1, 0), [[1.0]])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"topology": "star"}, "topology"),
        ({"world": 0}, "world"),
        ({"rank": 4}, "rank"),
        ({"rank": -1}, "rank"),
        ({"round_": -1}, "round_"),
        ({"topology": "random_regular", "k": 0}, "k"),
        ({"topology": "random_regular", "k": 4}, "k"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict, name: str) -> None:
    args = {"topology": "ring", "rank": 0, "world": 4, "round_": 0} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} "):
        out_peers(**args)


def test_bad_scheme() -> None:
    with pytest.raises(ValueError, match="^scheme "):
        mixing_matrix("ring", 4, 0, scheme="metropolis")
