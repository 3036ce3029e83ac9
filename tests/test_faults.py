"""Fault tolerance: fair inbound queues, Byzantine peers, partitions, crashes and signals."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
import zmq
from gossip_fixture import FakePeer, addresses, build, close_all, params_of, run_id_of, step_until

from gossipdqn.config import ConfigError, load_config
from gossipdqn.faults import Inbox
from gossipdqn.wire import Kind

pytestmark = pytest.mark.timeout(120)


def test_inbox_serves_senders_in_turn_and_evicts_the_flooder() -> None:
    box = Inbox(limit=4)
    for i in range(10):
        box.put(b"flood", ("flood", i))
    assert len(box) == 4
    assert box.put(b"honest", ("honest", 0)) is False  # full: the longest queue lost its oldest
    assert box.take(3) == [("flood", 7), ("honest", 0), ("flood", 8)]
    assert box.take(10) == [("flood", 9)] and len(box) == 0


def test_partition_entries_are_checked_when_the_config_loads() -> None:
    assert load_config(None, ['faults.partition=["2-5:0,1|2,3"]']).faults.partition
    with pytest.raises(ConfigError, match="faults.partition '5-2:0|1'"):
        load_config(None, ['faults.partition=["5-2:0|1"]'])


def consensus(nodes: list) -> float:
    """Mean distance of the nodes' parameters from their mean."""
    thetas = torch.stack([params_of(n) for n in nodes])
    return float((thetas - thetas.mean(0)).norm(dim=1).mean())


@pytest.mark.parametrize("robust", ["clip", "none"])
def test_byzantine_peer_is_clipped(tmp_path: Path, robust: str) -> None:
    peers = addresses(4)  # ranks 0-2 honest, 3 sends its parameters sign-flipped x1000
    nodes = build(
        tmp_path, peers, [0, 1, 2], [f'gossip.robust="{robust}"', "gossip.topology=complete"]
    )
    ctx = zmq.Context()
    sink = ctx.socket(zmq.ROUTER)  # takes what the honest nodes send rank 3, unread
    sink.linger = 0
    sink.bind(f"tcp://{peers[3]}")
    byzantine = FakePeer(3, run_id_of(peers), ctx)
    try:
        for address in peers[:3]:
            byzantine.connect(address)
            byzantine.send(address, byzantine.hello(nodes[0]))
        start = max(float(params_of(n).abs().max()) for n in nodes)
        peak, deadline = 0.0, time.monotonic() + 5
        while time.monotonic() < deadline:
            step_until(nodes, lambda: True, timeout_s=1)
            flipped = -1000 * torch.stack([params_of(n) for n in nodes]).mean(0) / 3
            for address, node in zip(peers[:3], nodes):
                frames = byzantine.message(
                    Kind.PARAMS, {"params": flipped.numpy()}, round=node.exchange.round, w=1 / 3
                )
                byzantine.send(address, frames)
            peak = max([peak, *(float(params_of(n).abs().max()) for n in nodes)])
        if robust == "clip":
            assert sum(n.exchange.peers[3].accepted for n in nodes) > 30  # the attack reached them
            assert all(torch.isfinite(params_of(n)).all() for n in nodes)
            assert peak < 10 * start, f"honest parameters grew from {start} to {peak}"
        else:
            assert peak > 100 * start  # without the defence the attack bites
    finally:
        byzantine.close()
        sink.close(linger=0)
        ctx.term()
        close_all(nodes)


def test_partition_heals_back_to_consensus(tmp_path: Path) -> None:
    cut_at, heal_at = 5.0, 8.0
    sets = ["gossip.topology=complete", f'faults.partition=["{cut_at}-{heal_at}:0,1|2,3"]']
    nodes = build(tmp_path, addresses(4), range(4), sets)
    started = time.monotonic()  # the transports started within the last moment
    try:

        def distances_until(t: float) -> list[float]:
            out = []
            while time.monotonic() - started < t:
                step_until(nodes, lambda: True, timeout_s=1)
                out.append(consensus(nodes))
            return out

        before = statistics.median(distances_until(cut_at)[-20:])
        during = max(distances_until(heal_at))
        after = distances_until(heal_at + 5)
        assert sum(n.exchange.transport.stats().dropped.get("partition", 0) for n in nodes) > 0
        assert during > 2 * before, (before, during)  # the halves drifted apart
        assert min(after[-20:]) < 1.5 * before, (before, during, after[-20:])
    finally:
        close_all(nodes)
