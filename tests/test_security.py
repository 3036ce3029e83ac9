"""Security of live gossip nodes: CURVE, strangers, raw bytes, a fuzzed hostile peer."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from gossip_fixture import (
    FakePeer,
    addresses,
    build,
    close_all,
    params_of,
    run_id_of,
    step_until,
)

from gossipdqn.cli import main
from gossipdqn.keys import load_node_keys
from gossipdqn.wire import Kind

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_keys_generate_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["keys", "generate", str(tmp_path / "keys"), "--nodes", "3"]) == 0
    for rank in range(3):
        secret = tmp_path / "keys" / f"node-{rank}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert (tmp_path / "keys" / "authorized" / f"node-{rank}.key").is_file()
    assert "security.keys_dir=" in capsys.readouterr().out
    assert main(["keys", "generate", str(tmp_path / "none"), "--nodes", "0"]) == 2


def test_missing_keys_refuse_to_start_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    peers = ",".join(addresses(2))
    code = main(["node", "--rank", "0", "--peers", peers, "--run-dir", str(tmp_path / "run"),
                 "--set", f'security.keys_dir="{tmp_path}"', "--quiet"])  # fmt: skip
    assert code == 2
    assert "gossipdqn keys generate" in capsys.readouterr().err


def attack(peers: list[str], keys_dir: Path, strangers_dir: Path, context: zmq.Context) -> int:
    """A stranger key, a plain client and raw bytes at node 1, each with messages that would be
    accepted were they let in; then a client with rank 2's key claiming to be node 0 (dropped).
    Returns how many messages the last one sent."""
    target, server_key = peers[1], load_node_keys(keys_dir, 1).public
    stranger = FakePeer(0, run_id_of(peers), context, keys=load_node_keys(strangers_dir, 0))
    plain = FakePeer(0, run_id_of(peers), context)
    liar = FakePeer(0, run_id_of(peers), context, keys=load_node_keys(keys_dir, 2))
    for fake in (stranger, plain, liar):
        fake.connect(target, server_key)
    host, port = target.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=2.0) as raw:
            raw.sendall(os.urandom(4096))
    params = np.zeros(1_000, np.float32)
    for fake in (stranger, plain, liar):
        for _ in range(5):
            frames = fake.message(Kind.PARAMS, {"params": params}, round=1, w=0.5)
            with contextlib.suppress(zmq.Again):  # refused at the handshake: nowhere to queue
                fake.send(target, frames, 0 if fake is liar else zmq.NOBLOCK)
    liar.send(target, liar.message(Kind.HELLO, addr="tcp://x", fp="x"))
    return 6


def test_curve_nodes_exchange_and_let_nothing_else_in(tmp_path: Path, context: zmq.Context) -> None:
    keys_dir, strangers_dir = tmp_path / "keys", tmp_path / "strangers"
    assert main(["keys", "generate", str(keys_dir), "--nodes", "3"]) == 0
    assert main(["keys", "generate", str(strangers_dir), "--nodes", "1"]) == 0
    peers = addresses(3)  # rank 2 never runs; its key is held by the liar
    a, b = nodes = build(tmp_path, peers, [0, 1], [f'security.keys_dir="{keys_dir}"'])
    try:
        both = lambda: all(  # noqa: E731
            n.exchange.counts.received[k] > 0 for n in nodes for k in ("params", "experience")
        )
        assert step_until(nodes, both, timeout_s=30), "CURVE peers did not exchange"
        lied = attack(peers, keys_dir, strangers_dir, context)
        honest_before = b.exchange.peers[0].accepted
        more = lambda: b.exchange.peers[0].accepted > honest_before + 10  # noqa: E731
        assert step_until(nodes, more, timeout_s=30), "the honest peer stopped arriving"
        sent, received = a.exchange.transport.stats, b.exchange.transport.stats
        mismatched = lambda: b.exchange.counts.dropped["sender_mismatch"] == lied  # noqa: E731
        assert step_until([b], mismatched, timeout_s=10), (b.exchange.counts, received())
        settled = lambda: received().messages_received == sent().messages_sent + lied  # noqa: E731
        assert step_until([b], settled, timeout_s=10), (received(), sent())
        assert b.exchange.peers[2].accepted == 0
        assert sum(b.exchange.counts.dropped.values()) == lied
        assert np.isfinite(params_of(b).numpy()).all()
    finally:
        close_all(nodes)
