"""Averaging math: push-sum reaches the exact mean with mass conserved; clipping by hand."""

import math

import pytest
import torch

from gossipdqn.gossip.mixing import (
    AdaptiveClipThreshold,
    centered_clip,
    consensus_distance,
    flatten,
    pairwise_average,
    push_sum_mix_,
    push_sum_receive,
    push_sum_receive_many,
    push_sum_share,
    robust_filter,
    unflatten_into,
)
from gossipdqn.gossip.topology import TOPOLOGIES, out_peers

WORLD, DIM = 16, 100
ROUNDS = {"ring": 1500, "exponential": 40, "random_regular": 80, "complete": 2}


def test_flatten_roundtrip_copies() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(net.parameters())
    flat = flatten(params)
    assert flat.shape == (3 * 4 + 4 + 4 * 2 + 2,) and not flat.requires_grad
    assert torch.equal(flat[:12], params[0].detach().reshape(-1))
    new = torch.arange(flat.numel(), dtype=flat.dtype)
    unflatten_into(new, params)
    assert torch.equal(flatten(params), new)
    new.zero_()  # the parameters hold copies, not views of `new`
    assert flatten(params).abs().sum() > 0
    with pytest.raises(ValueError, match="^flat "):
        unflatten_into(new[:-1], params)


def test_push_sum_share_and_receive_by_hand() -> None:
    theta = torch.tensor([3.0, 6.0], dtype=torch.float64)
    share = push_sum_share(theta, 1.5, 2)
    assert share.weight == 0.5
    assert torch.equal(share.payload, torch.tensor([1.5, 3.0], dtype=torch.float64))
    assert torch.equal(theta, torch.tensor([3.0, 6.0], dtype=torch.float64))
    # keep mass 0.5 * [3, 6]; receive 0.25 * [1, 1] (a peer at [4, 4] with weight 0.25)
    weight = push_sum_receive(theta, share.weight, torch.tensor([1.0, 1.0]).double(), 0.25)
    assert weight == 0.75
    torch.testing.assert_close(theta, torch.tensor([2.5 / 0.75, 4.0 / 0.75], dtype=torch.float64))


def test_push_sum_mix_of_de_biased_parameters_equals_receiving_their_mass() -> None:
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert push_sum_mix_(theta, 0.5, torch.tensor([4.0, 8.0]).double(), 0.25) == 0.75
    assert torch.equal(theta, torch.tensor([2.0, 4.0], dtype=torch.float64))  # (0.5θ + 0.25y)/0.75
    gen = torch.Generator().manual_seed(1)
    theta, peer = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    by_mass = theta.clone()
    expected_weight = push_sum_receive(by_mass, 0.6, peer * 0.3, 0.3)
    assert push_sum_mix_(theta, 0.6, peer, 0.3) == pytest.approx(expected_weight)
    torch.testing.assert_close(theta, by_mass)


def test_receive_many_equals_sequential_receives() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=gen, dtype=torch.float64)
    messages = [(torch.randn(5, generator=gen, dtype=torch.float64), w) for w in (0.2, 0.7)]
    one_by_one = theta.clone()
    weight = 0.4
    for payload, payload_weight in messages:
        weight = push_sum_receive(one_by_one, weight, payload, payload_weight)
    batched = theta.clone()
    assert push_sum_receive_many(batched, 0.4, messages) == pytest.approx(weight)
    torch.testing.assert_close(batched, one_by_one)
    assert push_sum_receive_many(batched, 0.4, []) == 0.4


def _push_sum_round(thetas: list, weights: list, topology: str, round_: int) -> None:
    """One synchronous push-sum round over all nodes, delivered node by node."""
    inbox: list[list] = [[] for _ in thetas]
    for rank in range(WORLD):
        peers = out_peers(topology, rank, WORLD, round_, seed=11)
        share = push_sum_share(thetas[rank], weights[rank], len(peers))
        weights[rank] = share.weight
        for peer in peers:
            inbox[peer].append((share.payload, share.weight))
    for rank in range(WORLD):
        weights[rank] = push_sum_receive_many(thetas[rank], weights[rank], inbox[rank])


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_push_sum_reaches_exact_mean_and_conserves_mass(topology: str) -> None:
    gen = torch.Generator().manual_seed(42)
    thetas = list(torch.randn(WORLD, DIM, generator=gen, dtype=torch.float64) * 5)
    weights = [1.0] * WORLD
    mean = torch.stack(thetas).mean(dim=0)
    mass = torch.stack(thetas).sum(dim=0)
    for round_ in range(ROUNDS[topology]):
        _push_sum_round(thetas, weights, topology, round_)
        assert sum(weights) == pytest.approx(WORLD, rel=1e-12)
        now = sum(w * t for w, t in zip(weights, thetas))
        torch.testing.assert_close(now, mass, rtol=1e-10, atol=1e-10)
    for theta in thetas:
        torch.testing.assert_close(theta, mean, rtol=0, atol=1e-6)


def test_pairwise_average_by_hand() -> None:
    theta = torch.tensor([0.0, 4.0])
    out = pairwise_average(theta, torch.tensor([2.0, 0.0]), alpha=0.25)
    assert out is theta
    assert torch.equal(theta, torch.tensor([0.5, 3.0]))
    with pytest.raises(ValueError, match="^alpha "):
        pairwise_average(theta, theta, alpha=1.5)


def test_centered_clip_by_hand() -> None:
    theta = torch.tensor([1.0, 1.0])
    far = torch.tensor([4.0, 5.0])  # 5 away along (3, 4)
    torch.testing.assert_close(centered_clip(theta, far, 2.5), torch.tensor([2.5, 3.0]))
    near = torch.tensor([1.0, 2.0])
    clipped = centered_clip(theta, near, 2.5)
    assert torch.equal(clipped, near) and clipped is not near
    torch.testing.assert_close(centered_clip(theta, far, 0.0), theta)
    with pytest.raises(ValueError, match="^tau "):
        centered_clip(theta, far, -1.0)


def test_adaptive_threshold_median_window_and_floor() -> None:
    threshold = AdaptiveClipThreshold(window=3, multiplier=2.0, floor=0.5, initial=10.0)
    assert threshold.tau == 10.0
    for distance in (1.0, 9.0, 2.0):
        threshold.observe(distance)
    assert threshold.tau == 4.0  # 2 * median(1, 9, 2)
    threshold.observe(0.1)  # window now (9, 2, 0.1)
    assert threshold.tau == 4.0
    for _ in range(3):
        threshold.observe(0.0)
    assert threshold.tau == 0.5
    assert AdaptiveClipThreshold().tau == math.inf
    with pytest.raises(ValueError, match="window"):
        AdaptiveClipThreshold(window=0)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("none", [10.0, 1.0]), ("clip", [3.0, 1.0]), ("reject", None)],
)
def test_robust_filter_modes(mode: str, expected: list | None) -> None:
    threshold = AdaptiveClipThreshold(multiplier=2.0)
    threshold.observe(1.0)  # tau = 2
    theta, peer = torch.tensor([1.0, 1.0]), torch.tensor([10.0, 1.0])
    out = robust_filter(theta, peer, mode, threshold)
    assert out is None if expected is None else torch.equal(out, torch.tensor(expected))
    near = torch.tensor([2.0, 1.0])
    assert torch.equal(robust_filter(theta, near, mode, threshold), near)
    with pytest.raises(ValueError, match="^mode "):
        robust_filter(theta, near, "trim", threshold)


def test_consensus_distance_by_hand() -> None:
    theta = torch.tensor([3.0, 4.0])
    peers = [torch.tensor([3.0, 5.0]), torch.tensor([0.0, 0.0])]
    mean, ratio = consensus_distance(theta, peers)
    assert mean == pytest.approx(3.0) and ratio == pytest.approx(0.6)
    assert consensus_distance(theta, []) == (0.0, 0.0)
    assert consensus_distance(torch.zeros(2), [torch.ones(2)])[1] == math.inf


def test_adaptive_threshold_keeps_one_distance_per_source() -> None:
    threshold = AdaptiveClipThreshold(window=3, multiplier=1.0, initial=0.0, min_count=2)
    threshold.observe(1000.0, "byzantine")
    assert threshold.tau == 0.0  # one source is not enough to judge anyone by
    for _ in range(10):  # a peer that sends ten times as often still counts once
        threshold.observe(1000.0, "byzantine")
    threshold.observe(1.0, "a")
    assert threshold.tau == 1000.0  # one of two: no majority tells which is the outlier
    threshold.observe(2.0, "b")
    assert threshold.tau == 2.0  # the median of (1000, 1, 2): the byzantine counts once
