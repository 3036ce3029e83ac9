"""Security of live gossip nodes: CURVE, strangers, raw bytes, a fuzzed hostile peer."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from helpers.gossip_fixture import (
    FAST,
    FakePeer,
    addresses,
    build,
    close_all,
    params_of,
    rss_mib,
    run_id_of,
    step_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipdqn.cli import main
from gossipdqn.config import load_config
from gossipdqn.dqn.networks import fingerprint
from gossipdqn.gossip.nodes import gossip_node
from gossipdqn.net.keys import INSECURE_WARNING, load_node_keys
from gossipdqn.net.wire import Kind
from gossipdqn.node.metrics import format_progress
from gossipdqn.node.node import PROGRESS_EXCHANGE_KEYS, Node

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


def test_non_loopback_bind_without_keys_refuses_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    peers = ",".join(addresses(2))
    code = main(["node", "--rank", "0", "--peers", peers, "--bind", "0.0.0.0", "--run-dir",
                 str(tmp_path / "run"), "--set", "train.total_steps=200", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "refusing to bind tcp://0.0.0.0" in err and "gossipdqn keys generate" in err
    assert "security.insecure=true" in err


def test_insecure_node_warns_at_start_and_in_every_progress_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers = addresses(2)
    cfg = load_config(None, [*FAST, "security.insecure=true"])
    with caplog.at_level(logging.WARNING, logger="gossipdqn.net.keys"):
        loopback = gossip_node(cfg, tmp_path / "a", rank=0, addresses=peers, quiet=True)
        assert INSECURE_WARNING not in caplog.text
        node = gossip_node(
            cfg, tmp_path / "b", rank=1, addresses=peers, bind_host="0.0.0.0", quiet=True
        )
    try:
        assert INSECURE_WARNING in caplog.text
        lines = [
            format_progress(f"[node {n.exchange.rank}]", {"step": 0} | {
                k: n.exchange.metrics().get(k) for k in PROGRESS_EXCHANGE_KEYS
            }) for n in (loopback, node)
        ]  # fmt: skip
        assert "INSECURE" not in lines[0] and "INSECURE: unauthenticated" in lines[1]
    finally:
        close_all([loopback, node])


def attack(
    peers: list[str],
    keys_dir: Path,
    strangers_dir: Path,
    context: zmq.Context,
    fakes: list,
    n_params: int,
) -> int:
    """A stranger key, a plain client and raw bytes at node 1, each with messages that would be
    accepted were they let in; then a client with rank 2's key claiming to be node 0 (dropped).
    The fake peers go into `fakes`: the caller closes them once their messages had time to
    arrive (a garbage-collected socket closes at once and drops its queue).
    Returns how many messages the last one sent."""
    target, server_key = peers[1], load_node_keys(keys_dir, 1).public
    stranger = FakePeer(0, run_id_of(peers), context, keys=load_node_keys(strangers_dir, 0))
    plain = FakePeer(0, run_id_of(peers), context)
    liar = FakePeer(0, run_id_of(peers), context, keys=load_node_keys(keys_dir, 2))
    fakes += [stranger, plain, liar]
    for fake in (stranger, plain, liar):
        fake.connect(target, server_key)
    host, port = target.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=2.0) as raw:
            raw.sendall(os.urandom(4096))
    params = np.zeros(n_params, np.float32)  # our model's size: only the sender is wrong
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
    fakes: list[FakePeer] = []
    try:
        both = lambda: all(  # noqa: E731
            n.exchange.counts.received[k] > 0 for n in nodes for k in ("params", "experience")
        )
        assert step_until(nodes, both, timeout_s=30), "CURVE peers did not exchange"
        lied = attack(peers, keys_dir, strangers_dir, context, fakes, params_of(b).numel())
        honest_before = b.exchange.peers[0].accepted
        more = lambda: b.exchange.peers[0].accepted > honest_before + 10  # noqa: E731
        assert step_until(nodes, more, timeout_s=30), "the honest peer stopped arriving"
        sent, received = a.exchange.transport.stats, b.exchange.transport.stats
        mismatched = lambda: b.exchange.counts.dropped["sender_mismatch"] == lied  # noqa: E731
        assert step_until([b], mismatched, timeout_s=10), (b.exchange.counts.dropped, received())
        settled = lambda: received().messages_received == sent().messages_sent + lied  # noqa: E731
        assert step_until([b], settled, timeout_s=10), (received(), sent())
        assert b.exchange.peers[2].accepted == 0
        assert sum(b.exchange.counts.dropped.values()) == lied
        assert np.isfinite(params_of(b).numpy()).all()
    finally:
        for fake in fakes:
            fake.close()
        close_all(nodes)


def peak_rss_mib(reset: bool = False) -> float:
    """This process's peak resident set size in MiB since the last reset."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # starts VmHWM again from VmRSS
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def test_more_and_larger_frames_than_honest_peers_send_are_held_to_the_bounds(
    tmp_path: Path, context: zmq.Context
) -> None:
    peers = addresses(3)  # 0: the node under attack, 1: an honest peer, 2: the stranger
    nodes = build(tmp_path, peers, [0, 1], [])
    target = nodes[0]
    stranger = FakePeer(2, run_id_of(peers), context)
    stranger.connect(peers[0])
    mixed = lambda: target.exchange.mixer.rate.total  # noqa: E731
    heard = lambda n: lambda: target.exchange.peers[2].accepted == n  # noqa: E731
    try:
        assert step_until(nodes, lambda: mixed() > 3, timeout_s=30)
        stranger.send(peers[0], stranger.hello(target))
        assert step_until(nodes, heard(1), timeout_s=10)
        bound = target.exchange.transport.max_frame_bytes
        assert bound < 1 << 20  # a small CartPole net: far below the old 64 MiB
        large = np.ones(8 << 20, np.uint8)  # 8 MiB frames: larger than any honest frame
        within = np.ones(bound - 64, np.uint8)  # frames within the bound, 100 to a message
        header = stranger.message(Kind.PARAMS, {"params": np.zeros(1, np.float32)})[0]
        mixed_before, rss_before = mixed(), peak_rss_mib(reset=True)
        for _ in range(3):
            stranger.send(peers[0], [header, *[large] * 40])
        for _ in range(3):
            stranger.send(peers[0], [header, *[within] * 100])
        stranger.send(peers[0], stranger.hello(target))  # sent after them, so arrives after
        assert step_until(nodes, heard(2), timeout_s=30), "the stranger's last hello never came"
        assert target.exchange.transport.stats().dropped.get("malformed") == 3
        grown = peak_rss_mib() - rss_before
        assert grown < 64, grown
        assert step_until(nodes, lambda: mixed() > mixed_before + 3, timeout_s=30)
    finally:
        stranger.close()
        close_all(nodes)


# --- fuzzing a live node ------------------------------------------------------------------


def experience() -> dict[str, np.ndarray]:
    """Four CartPole transitions a node would accept."""
    obs = np.zeros((4, 4), np.float32)
    return {
        "obs": obs, "actions": np.zeros(4, np.int64), "rewards": np.ones(4, np.float32),
        "next_obs": obs, "discounts": np.full(4, 0.9, np.float32),
    }  # fmt: skip


def valid_messages(fake: FakePeer, node: Node) -> list[list[bytes]]:
    """A HELLO, PARAMS and EXPERIENCE that node would accept from `fake` (as bytes frames)."""
    n_params = params_of(node).numel()
    made = [
        fake.hello(node),
        fake.message(
            Kind.PARAMS, {"params": np.zeros(n_params, np.float32)}, round=1, w=0.5, sum=0.5,
            to=node.exchange.incarnation,
        ),
        fake.message(Kind.EXPERIENCE, experience()),
    ]
    return [[bytes(f) for f in frames] for frames in made]


def hostile_messages(fake: FakePeer, node: Node) -> list[list[bytes]]:
    """Hand-made messages a node must refuse; each carries the right run id and sender."""
    n = params_of(node).numel()
    params = valid_messages(fake, node)[1]
    header = msgpack.unpackb(params[0])

    def with_header(frames: list[bytes], **change: object) -> list[bytes]:
        return [msgpack.packb({**header, **change}), *frames[1:]]

    def params_msg(arr: np.ndarray, **meta: object) -> list:
        honest = {"round": 1, "w": 0.5, "sum": 0.5, "to": node.exchange.incarnation}
        return fake.message(Kind.PARAMS, {"params": arr}, **(honest | meta))

    def experience_with(**change: np.ndarray) -> list:
        return fake.message(Kind.EXPERIENCE, experience() | change)

    obs = np.zeros((4, 4), np.float32)
    made = [
        with_header(params, x=[["params", "float32", [2**31, 2**31]]]),  # huge claimed shape
        with_header(params, x=[["params", "float32", [2**32]]]),  # a 2^32 length
        with_header(params, x=[["params", "float32", [1] * 9]]),
        with_header(params, s=1),  # wrong sender
        with_header(params, r="another-run!"),
        with_header(params, k=99),
        [msgpack.packb(functools.reduce(lambda a, _: [a], range(500), 0))],  # deep nesting
        [b"\x81\xdb\xff\xff\xff\xff" + b"x" * 10],  # a str claiming 2^32 - 1 bytes
        [b"\xdd\x00\x0f\x42\x40"],  # an array claiming a million items
        params_msg(np.full(n, np.nan, np.float32)),
        params_msg(np.full(n, np.inf, np.float32)),
        params_msg(np.full(n, 1e30, np.float32)),
        params_msg(np.zeros(n, np.float64)),
        params_msg(np.zeros(n + 1, np.float32)),
        params_msg(np.zeros(n, np.float32), w=1e-30),
        params_msg(np.zeros(n, np.float32), w=1e30),
        params_msg(np.zeros(n, np.float32), round=-1),
        fake.message(Kind.PARAMS, {"params": np.zeros(n, np.float32), "x": obs}, round=1, w=0.5),
        experience_with(obs=np.full((4, 4), np.nan, np.float32)),
        experience_with(next_obs=np.full((4, 4), 1e30, np.float32)),
        experience_with(actions=np.full(4, 7, np.int64)),
        experience_with(actions=np.zeros(4, np.int32)),
        experience_with(rewards=np.full(4, 1e30, np.float32)),
        experience_with(discounts=np.full(4, 2.0, np.float32)),
        experience_with(obs=np.zeros((4, 5), np.float32)),
        fake.message(Kind.HELLO, {"x": obs}, addr="x", fp=fingerprint(node.learner.online)),
        fake.message(Kind.HELLO, addr="x", fp="not our network"),
        fake.message(Kind.HELLO, fp=fingerprint(node.learner.online)),
        fake.message(Kind.GRADIENTS, {"params": np.zeros(n, np.float32)}),
        fake.message(Kind.PULL),
    ]
    return [[bytes(f) for f in frames] for frames in made]


@st.composite
def fuzzed(draw: st.DrawFn, valid: list, wrong_run: list, hostile: list) -> list[bytes]:
    """A mutated, truncated, random or hand-made hostile message; never an acceptable one."""
    how = draw(st.sampled_from(["mutate", "truncate", "random", "hostile"]))
    if how == "random":
        return draw(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
    if how == "hostile":
        return draw(st.sampled_from(hostile))
    frames = [
        bytearray(f) for f in draw(st.sampled_from(valid if how == "truncate" else wrong_run))
    ]
    i = draw(st.integers(0, len(frames) - 1))
    if how == "truncate":  # a valid message cut short: some frame loses bytes, or goes
        if len(frames) > 1 and draw(st.booleans()):
            del frames[-1]
        else:
            del frames[i][draw(st.integers(0, max(0, len(frames[i]) - 1))) :]
    else:  # a message of another run (mutations cannot make its run id ours) with bytes flipped
        for _ in range(draw(st.integers(1, 8))):
            if frames[i]:
                frames[i][draw(st.integers(0, len(frames[i]) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            frames.append(bytearray(draw(st.binary(max_size=64))))
    return [bytes(f) for f in frames]


def test_fuzzed_peer_is_never_processed(tmp_path: Path, context: zmq.Context) -> None:
    peers = addresses(3)  # 0: the node under attack, 1: an honest peer, 2: the fuzzer
    nodes = build(tmp_path, peers, [0, 1], ["gossip.queue_messages=64"])
    target = nodes[0]
    fuzzer = FakePeer(2, run_id_of(peers), context)
    fuzzer.connect(peers[0])
    other_run = FakePeer(2, "X" * len(run_id_of(peers)), context)
    try:
        assert step_until(nodes, lambda: target.exchange.peers[1].accepted > 20, timeout_s=30)
        valid, wrong_run = valid_messages(fuzzer, target), valid_messages(other_run, target)
        hostile = hostile_messages(fuzzer, target)
        sent, sentinels, last = [0], [1], [fuzzer.hello(target)]
        fuzzer.send(peers[0], last[0])
        seen = lambda: target.exchange.peers[2].last_seq == fuzzer.seq  # noqa: E731
        assert step_until(nodes, seen, timeout_s=10)
        honest_before, rss_before = target.exchange.peers[1].accepted, rss_mib()

        @settings(max_examples=100, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(st.lists(fuzzed(valid, wrong_run, hostile), min_size=50, max_size=70))
        def attack_once(batch: list[list[bytes]]) -> None:
            for frames in [*batch, *hostile[: 0 if sent[0] else None], last[0]]:
                fuzzer.send(peers[0], frames)  # `last`: the previous sentinel, now a replay
            sent[0] += len(batch) + 1
            last[0] = fuzzer.hello(target)
            fuzzer.send(peers[0], last[0])
            sentinels[0] += 1
            assert step_until(nodes, seen, timeout_s=10), "the sentinel never arrived"
            assert target.exchange.peers[2].accepted == sentinels[0], "a fuzzed message got in"

        attack_once()
        assert sent[0] >= 5_000
        stats = target.exchange.transport.stats()
        assert stats.errors == 0 and "inbound_full" not in stats.dropped  # all were judged
        assert target.exchange.peers[1].accepted > honest_before + 20, "the honest peer stalled"
        assert rss_mib() - rss_before < 100
        assert np.isfinite(params_of(target).numpy()).all()
        assert np.isfinite(target.replay.sample(64, 0.4).obs).all()
    finally:
        fuzzer.close()
        close_all(nodes)
