"""Fault tolerance: fair inbound queues, Byzantine peers, partitions, crashes and signals."""

from __future__ import annotations

import json
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from helpers.gossip_fixture import (
    FakePeer,
    addresses,
    build,
    close_all,
    params_of,
    run_id_of,
    step_until,
)
from helpers.waiting import wait_for
from test_gossip import read_peers

from gossipdqn.cluster.local import node_command
from gossipdqn.cluster.procs import stop as stop_processes
from gossipdqn.config import ConfigError, load_config
from gossipdqn.net.queues import Inbox
from gossipdqn.net.wire import Kind
from gossipdqn.node.checkpoint import load_checkpoint

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
        peak, deadline, sent = 0.0, time.monotonic() + 60, 0
        attacked = lambda: sum(n.exchange.peers[3].accepted for n in nodes) > 30  # noqa: E731
        bitten = lambda: robust == "none" and peak > 100 * start  # noqa: E731
        while not (attacked() or bitten()) and time.monotonic() < deadline:  # however slow we are
            step_until(nodes, lambda: True, timeout_s=1)
            flipped = -1000 * torch.stack([params_of(n) for n in nodes]).mean(0) / 3
            sent += 1
            for address, node in zip(peers[:3], nodes):
                frames = byzantine.message(
                    Kind.PARAMS, {"params": flipped.numpy()}, round=node.exchange.round,
                    w=1 / 3, sum=sent / 3, to=node.exchange.incarnation,
                )  # fmt: skip
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
        assert sum(n.exchange.transport.stats().dropped.get("partition", 0) for n in nodes) > 0
        assert during > 2 * before, (before, during)  # the halves drifted apart
        healed = lambda: consensus(nodes) < 1.5 * before  # noqa: E731
        assert step_until(nodes, healed, timeout_s=20), (before, during, consensus(nodes))
    finally:
        close_all(nodes)


# --- processes: crashes and signals ------------------------------------------------------

WRITER = """
import sys, torch
from gossipdqn.node.checkpoint import save_checkpoint
i = int(sys.argv[2])
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"i": i, "blob": torch.full((2_000_000,), float(i))})
    print(i, flush=True)
"""


def test_kill_9_during_checkpoint_writes_leaves_the_last_complete_one(tmp_path: Path) -> None:
    path, done, rng = tmp_path / "checkpoint.pt", 0, random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(done)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            for _ in range(2):
                done = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.1))  # a random moment, most likely mid-write
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
        state = load_checkpoint(path)
        assert state["i"] >= done and (state["blob"] == state["i"]).all()
        done = state["i"]


def node_commands(tmp_path: Path, n: int, sets: list[str]) -> list[list[str]]:
    peers, passthrough = addresses(n), [a for s in sets for a in ("--set", s)]
    return [node_command(r, peers, tmp_path, passthrough, resume=False) for r in range(n)]


def popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


PROC_SETS = [
    "train.total_steps=100000000", "train.progress_every_s=0.25", "gossip.peer_timeout_s=2",
    "gossip.heartbeat_s=0.25", "eval.every_steps=0", "network.hidden=[16,16]",
]  # fmt: skip


def sigterm_exits_within_5_s(proc: subprocess.Popen) -> None:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert time.monotonic() - started < 5 and proc.returncode == 0


def test_sigterm_with_dead_peers_checkpoints_and_exits_within_5_s(tmp_path: Path) -> None:
    # its two peers never answer, and it does not wait for them
    proc = popen(node_commands(tmp_path, 3, [*PROC_SETS, "gossip.rendezvous_s=0"])[0])
    try:
        read_peers(proc, 0)
        sigterm_exits_within_5_s(proc)
    finally:
        stop_processes([proc], grace_s=1)
    state = load_checkpoint(tmp_path / "node-0" / "checkpoint.pt")
    assert state["progress"]["env_steps"] > 0
    assert json.loads((tmp_path / "node-0" / "summary.json").read_text())["interrupted"]


def read_until(proc: subprocess.Popen, text: str, max_lines: int = 400) -> list[str]:
    """The node's output lines up to the first that holds `text`."""
    lines = []
    while len(lines) < max_lines and (line := proc.stdout.readline()):
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r}:\n{''.join(lines[-20:])}")


def test_peers_never_heard_are_named_and_the_node_trains_without_them(tmp_path: Path) -> None:
    proc = popen(node_commands(tmp_path, 3, [*PROC_SETS, "gossip.rendezvous_s=1"])[0])
    try:
        read_until(proc, "waits up to 1 s for peers [1, 2] before training")
        read_until(proc, "starts without peers [1, 2]: not heard within gossip.rendezvous_s")
        read_peers(proc, 0)  # then it trains
    finally:
        stop_processes([proc], grace_s=5)


def test_sigterm_during_the_rendezvous_exits_at_once(tmp_path: Path) -> None:
    proc = popen(node_commands(tmp_path, 2, PROC_SETS)[0])  # waits up to 60 s for node 1
    try:
        read_until(proc, "waits up to 60 s for peers [1]")
        sigterm_exits_within_5_s(proc)
    finally:
        stop_processes([proc], grace_s=1)
    summary = json.loads((tmp_path / "node-0" / "summary.json").read_text())
    assert summary["interrupted"] and summary["env_steps"] == 0


def test_stopped_node_is_skipped_and_a_killed_one_resumes(tmp_path: Path) -> None:
    # updates start before the first checkpoint, so every checkpoint holds Adam's moments
    sets = [*PROC_SETS, "checkpoint.every_steps=500", "checkpoint.replay=true"]
    sets.append("learner.learning_starts=100")
    cmds = node_commands(tmp_path, 2, sets)
    procs = [popen(cmd) for cmd in cmds]
    try:
        read_peers(procs[0], 1)
        procs[1].send_signal(signal.SIGSTOP)
        read_peers(procs[0], 0)
        procs[1].send_signal(signal.SIGCONT)
        read_peers(procs[0], 1)
        read_peers(procs[1], 1)
        checkpoint = tmp_path / "node-1" / "checkpoint.pt"
        wait_for(checkpoint.is_file, 60, "node 1's first checkpoint")
        procs[1].kill()
        procs[1].wait(timeout=10)
        saved = load_checkpoint(tmp_path / "node-1" / "checkpoint.pt")
        read_peers(procs[0], 0)
        procs[1] = popen([a if a != "--run-dir" else "--resume" for a in cmds[1]])
        read_peers(procs[1], 1)
        read_peers(procs[0], 1)
    finally:
        stop_processes(procs, grace_s=10)
    final = load_checkpoint(tmp_path / "node-1" / "checkpoint.pt")
    assert final["progress"]["env_steps"] > saved["progress"]["env_steps"]
    assert final["actor"]["steps"] > saved["actor"]["steps"]  # epsilon goes on decaying
    adam = next(iter(final["learner"]["optimizer"]["state"].values()))
    assert int(adam["step"]) == final["learner"]["updates"]  # its moments came back too
    assert final["replay"]["added"] > saved["replay"]["added"] >= saved["replay"]["size"] > 0
