"""Who talks to whom in gossip round r: peer graphs as pure functions of (rank, world, round).

Every node computes the same graph from the same arguments without talking to anyone: the
random graphs are drawn from a generator seeded by (seed, round). Liveness is not handled here;
the gossip layer skips peers it believes dead.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Topology = Literal["ring", "exponential", "random_regular", "complete"]
TOPOLOGIES: tuple[str, ...] = ("ring", "exponential", "random_regular", "complete")
SCHEMES: tuple[str, ...] = ("push_sum", "pairwise")


def _check(topology: str, world: int, round_: int, k: int | None) -> int:
    """Validate the common arguments; return the out-degree of every node."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    if not isinstance(world, (int, np.integer)) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    if not isinstance(round_, (int, np.integer)) or round_ < 0:
        raise ValueError(f"round_ must be an integer >= 0, got {round_!r}")
    if world == 1:
        return 0
    if topology == "random_regular":
        k = min(2, world - 1) if k is None else k
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= world - 1:
            raise ValueError(f"k must be an integer in [1, world-1] = [1, {world - 1}], got {k!r}")
        return int(k)
    return world - 1 if topology == "complete" else 1


def _check_rank(rank: int, world: int) -> None:
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in [0, world) = [0, {world}), got {rank!r}")


def exponential_period(world: int) -> int:
    """Number of rounds after which the exponential graph repeats: ceil(log2 world), at least 1."""
    return max(1, math.ceil(math.log2(world))) if world > 1 else 1


def _random_regular(ranks: np.ndarray, world: int, round_: int, k: int, seed: int) -> np.ndarray:
    """k permutation shifts of a random circular order: k out- and k in-peers, no self-loops."""
    rng = np.random.default_rng((seed, round_))
    order = rng.permutation(world)
    position = np.empty(world, dtype=np.int64)
    position[order] = np.arange(world)
    shifts = rng.choice(np.arange(1, world), size=k, replace=False)
    return order[(position[ranks][:, None] + shifts[None, :]) % world]


def _targets(
    topology: str, ranks: np.ndarray, world: int, round_: int, degree: int, seed: int
) -> np.ndarray:
    """Out-peers of each rank in `ranks`, one row per rank, `degree` columns."""
    if degree == 0:
        return np.empty((len(ranks), 0), dtype=np.int64)
    if topology == "ring":
        return ((ranks + 1) % world)[:, None]
    if topology == "exponential":
        shift = 2 ** (round_ % exponential_period(world))
        return ((ranks + shift) % world)[:, None]
    if topology == "complete":
        return (ranks[:, None] + np.arange(1, world)[None, :]) % world
    return _random_regular(ranks, world, round_, degree, seed)


def peer_table(
    topology: str, world: int, round_: int, *, k: int | None = None, seed: int = 0
) -> np.ndarray:
    """Out-peers of every rank this round as a (world, out-degree) int64 array."""
    degree = _check(topology, world, round_, k)
    return _targets(topology, np.arange(world), world, round_, degree, seed)


def out_peers(
    topology: str, rank: int, world: int, round_: int, *, k: int | None = None, seed: int = 0
) -> list[int]:
    """Ranks that `rank` sends to in round `round_` (k: random_regular degree, min(2, world-1))."""
    degree = _check(topology, world, round_, k)
    _check_rank(rank, world)
    return _targets(topology, np.array([rank]), world, round_, degree, seed)[0].tolist()


def in_peers(
    topology: str, rank: int, world: int, round_: int, *, k: int | None = None, seed: int = 0
) -> list[int]:
    """Ranks that send to `rank` in round `round_`, sorted."""
    table = peer_table(topology, world, round_, k=k, seed=seed)
    _check_rank(rank, world)
    return np.nonzero((table == rank).any(axis=1))[0].tolist()


def _metropolis(table: np.ndarray) -> np.ndarray:
    """Symmetric doubly-stochastic Metropolis-Hastings weights on the undirected round graph."""
    world = table.shape[0]
    adjacent = np.zeros((world, world), dtype=bool)
    adjacent[np.repeat(np.arange(world), table.shape[1]), table.ravel()] = True
    adjacent |= adjacent.T
    degree = adjacent.sum(axis=1)
    matrix = np.where(adjacent, 1.0 / (1.0 + np.maximum(degree[:, None], degree[None, :])), 0.0)
    matrix[np.diag_indices(world)] = 1.0 - matrix.sum(axis=1)
    return matrix


def mixing_matrix(
    topology: str,
    world: int,
    round_: int,
    *,
    k: int | None = None,
    seed: int = 0,
    scheme: str = "push_sum",
) -> np.ndarray:
    """World x world mixing matrix M of this round (new = M @ old, column j is what j gives).

    push_sum: column-stochastic; node j keeps 1/(d+1) and gives 1/(d+1) to each of its d
    out-peers. pairwise: symmetric doubly-stochastic Metropolis-Hastings weights on the round's
    graph with directions dropped.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    table = peer_table(topology, world, round_, k=k, seed=seed)
    if scheme == "pairwise":
        return _metropolis(table)
    share = 1.0 / (table.shape[1] + 1)
    matrix = np.eye(world) * share
    matrix[table.ravel(), np.repeat(np.arange(world), table.shape[1])] = share
    return matrix


def diameter(
    topology: str, world: int, *, k: int | None = None, seed: int = 0, rounds: int | None = None
) -> int:
    """Rounds, from round 0, until information from every node has reached every other node.

    `rounds` caps the search (default 4 * world + 16); RuntimeError if the cap is hit.
    """
    _check(topology, world, 0, k)
    cap = 4 * world + 16 if rounds is None else rounds
    reached = np.eye(world, dtype=bool)  # reached[i, j]: what i knew at round 0 is known by j
    for round_ in range(cap + 1):
        if reached.all():
            return round_
        table = peer_table(topology, world, round_, k=k, seed=seed)
        sends = np.zeros((world, world), dtype=bool)
        sends[np.repeat(np.arange(world), table.shape[1]), table.ravel()] = True
        reached |= (reached.astype(np.int64) @ sends.astype(np.int64)) > 0
    raise RuntimeError(f"{topology} graph of {world} nodes not connected within {cap} rounds")
