"""Push-sum through the node's own mixing code, many nodes in one process, under every fault."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gossipdqn.gossip.mixer import Mixer
from gossipdqn.gossip.mixing import PushSumLinks, link_gain
from gossipdqn.gossip.peers import Peer
from gossipdqn.gossip.simulation import FaultModel, Restart, Swarm, gossip_settings
from gossipdqn.net.wire import Kind, Message

WORLD, DIM, ROUNDS = 16, 8, 2000
FAULTS = FaultModel(
    drop=0.1, duplicate=0.1, delay=0.1,
    restarts=(Restart(300, 5, resume=True), Restart(900, 5, resume=False)),
    partition=(400, 700, frozenset(range(WORLD // 2))),
)  # fmt: skip
"""30% of messages dropped, duplicated or delayed; node 5 restarted twice; a partition heals."""


def initial() -> torch.Tensor:
    return torch.randn(WORLD, DIM, generator=torch.Generator().manual_seed(0)) + 3.0


def test_link_totals_carry_a_lost_share_and_ignore_duplicates() -> None:
    links = PushSumLinks()
    (_, first, total1), (_, _, _) = links.split([(1, 7), (2, 8)])
    assert first == pytest.approx(1 / 3) and links.weight == pytest.approx(1 / 3)
    (_, second, total2), _ = links.split([(1, 7), (2, 8)])
    assert total2 == pytest.approx(1 / 3 + 1 / 9)
    # the first message to rank 1 is lost: the second brings both shares
    gain, seen = link_gain(0.0, second, total2, addressed=True, cap=16.0)
    assert gain == pytest.approx(first + second) and seen == total2
    assert link_gain(seen, second, total2, addressed=True, cap=16.0)[0] == 0.0  # a duplicate
    assert link_gain(seen, first, total1, addressed=True, cap=16.0)[0] == 0.0  # an older one
    # meant for an incarnation of ours that is gone: its own share, the link untouched
    assert link_gain(seen, second, total2, addressed=False, cap=16.0) == (second, seen)
    assert link_gain(None, 1.0, 1e9, addressed=True, cap=16.0)[0] == 16.0  # a hostile total


def test_without_faults_the_nodes_reach_the_exact_mean() -> None:
    swarm = Swarm(initial(), gossip_settings(), FaultModel(), seed=1)
    mean = initial().mean(dim=0)
    for _ in range(50):
        swarm.step()
    assert sum(swarm.weights()) == pytest.approx(WORLD)
    for node in swarm.nodes:
        assert torch.allclose(node.theta, mean, rtol=1e-5, atol=1e-5)


def test_faults_never_stop_mixing_and_the_nodes_converge_to_one_value() -> None:
    clean = Swarm(initial(), gossip_settings(), FaultModel(), seed=1)
    swarm = Swarm(initial(), gossip_settings(), FAULTS, seed=1)
    assert swarm.spread() > 0.1  # they start apart
    for _ in range(ROUNDS):
        swarm.step()
        clean.step()
    assert swarm.longest_gap() <= 20, "a node went 20 rounds without mixing anything in"
    assert swarm.spread() < 1e-3
    assert min(swarm.weights()) > 0.01  # no weight drains away; it is conserved but for restarts
    pending = sum(
        total - swarm.nodes[target].peers[node.rank].link_seen.get(node.incarnation, 0.0)
        for node in swarm.nodes
        for (target, inc), total in node.mixer.links.sent.items()
        if inc == swarm.nodes[target].incarnation
    )
    assert 14.0 < sum(swarm.weights()) + pending <= WORLD + 1e-6


@pytest.mark.parametrize("robust", ["clip", "reject"])
def test_robust_mixing_never_destroys_weight_at_start_up(robust: str) -> None:
    swarm = Swarm(initial(), gossip_settings(robust=robust), FaultModel(), seed=1)
    for _ in range(200):
        swarm.step()
    assert sum(swarm.weights()) == pytest.approx(WORLD)
    assert all(0.5 <= w <= 2.0 for w in swarm.weights())


@pytest.mark.parametrize("seed", [9, 34, 35])
def test_reject_never_splits_honest_nodes_for_good(seed: int) -> None:
    # seeds where, judged against the lower median, two honest pairs refused each other for good
    start = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) + 3.0
    settings = gossip_settings(robust="reject", topology="exponential")
    swarm = Swarm(start, settings, FaultModel(drop=0.2, delay=0.2), seed=seed)
    for _ in range(300):
        swarm.step()
    assert swarm.spread() < 1e-3, f"honest nodes stayed {swarm.spread():.3g} apart"


def test_a_sink_gets_no_weight_and_the_others_keep_mixing() -> None:
    swarm = Swarm(initial(), gossip_settings(), FaultModel(sinks=frozenset({3})), seed=1)
    for _ in range(300):
        swarm.step()
    assert swarm.nodes[3].mixer.rate.total == 0
    assert sum(w for r, w in enumerate(swarm.weights()) if r != 3) == pytest.approx(WORLD - 1)
    assert swarm.spread() < 1e-4 and swarm.longest_gap() <= 5


def test_a_refused_message_still_brings_its_weight_and_leaves_theta_alone() -> None:
    mixer = Mixer(gossip_settings(robust="reject"), world=4, rank=0)
    theta = torch.ones(8)
    for source in ("a", "b"):  # two peers close by: tau becomes small
        mixer.clip.observe(0.01, source)

    def params(value: float, total: float) -> Message:
        meta = {"round": 1, "inc": 5, "gen": 0, "w": 0.5, "sum": total, "to": 9}
        return Message(Kind.PARAMS, "run", 1, 1, 0, {"params": np.full(8, value, np.float32)}, meta)

    peer = Peer("far")
    peer.link_seen[5] = 0.0
    mixer.mix(theta, peer, params(100.0, 0.75), incarnation=9)
    assert mixer.rejected == 1 and torch.equal(theta, torch.ones(8))
    assert mixer.links.weight == pytest.approx(1.75)  # the link total's growth, kept
    mixer.mix(theta, peer, params(1.0, 1.25), incarnation=9)  # near: mixed in, weight added
    assert mixer.rejected == 1 and mixer.links.weight == pytest.approx(2.25)
