"""Transport over real loopback TCP: exchange, bounded queues, restarts, faults and CURVE."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers.handshake import dial, handshake_outcome

from gossipdqn.config import FaultsConfig, GossipConfig, SecurityConfig
from gossipdqn.net.faults import FaultInjector
from gossipdqn.net.keys import SecurityError, generate_keys, load_node_keys
from gossipdqn.net.queues import Outbox
from gossipdqn.net.transport import Inbound, Transport, TransportError
from gossipdqn.net.wire import Kind, Message, WireError, WireLimits, decode, encode
from gossipdqn.partition import parse_partition

pytestmark = pytest.mark.timeout(60)

GOSSIP = GossipConfig(heartbeat_s=0.1, peer_timeout_s=1.0, queue_messages=8)
NO_SECURITY, NO_FAULTS = SecurityConfig(), FaultsConfig()


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so no outbound connection takes it."""
    while True:
        port = random.randrange(20_000, 32_000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:  # a plain socket closes synchronously, unlike zmq's
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def url(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def frames_of(seq: int, size: int = 4) -> list:
    msg = Message(Kind.PARAMS, "run", 0, seq, 0, {"w": np.full(size, seq, np.float32)})
    return encode(msg)


def seq_of(inbound: Inbound) -> int:
    return decode(inbound.frames, WireLimits(), run_id=None).seq


def collect(t: Transport, count: int, timeout_s: float = 10.0) -> list[Inbound]:
    """Wait for `count` messages (or the deadline) and return what arrived."""
    got: list[Inbound] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and t.wait(max(0.0, deadline - time.monotonic())):
        got += t.receive()
    return got


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def make() -> Iterator[Callable[..., Transport]]:
    """Start transports that are all closed at teardown."""
    made: list[Transport] = []

    def _make(rank: int, port: int, peers: dict[int, int], **kwargs) -> Transport:
        t = Transport(
            rank,
            kwargs.pop("bind", url(port)),
            {p: url(pp) for p, pp in peers.items()},
            kwargs.pop("gossip", GOSSIP),
            kwargs.pop("security", NO_SECURITY),
            kwargs.pop("faults", NO_FAULTS),
            **kwargs,
        )
        made.append(t)
        t.start()
        return t

    yield _make
    for t in made:
        t.close(timeout_s=2.0)


@pytest.fixture
def raw_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_two_transports_exchange_both_ways(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a, b = make(0, pa, {1: pb}), make(1, pb, {0: pa})
    assert a.send(1, frames_of(1)) and b.send(0, frames_of(2))
    (at_b,), (at_a,) = collect(b, 1), collect(a, 1)
    assert (seq_of(at_b), seq_of(at_a)) == (1, 2)
    assert (b.rank_of(at_b), a.rank_of(at_a)) == (0, 1)
    assert at_b.user_id is None and at_b.peer_identity.startswith(b"0:")
    assert eventually(lambda: a.stats().messages_sent == 1 and a.stats().bytes_sent > 16)
    assert b.stats().messages_received == 1 and b.stats().bytes_received == a.stats().bytes_sent


def test_inproc_on_a_shared_context(raw_context: zmq.Context) -> None:
    def node(rank: int) -> Transport:
        peer = 1 - rank
        return Transport(
            rank,
            f"inproc://n{rank}",
            {peer: f"inproc://n{peer}"},
            GOSSIP,
            NO_SECURITY,
            NO_FAULTS,
            context=raw_context,
        )

    with node(0) as a:
        a.send(1, frames_of(1))  # queued before the peer exists
        with node(1) as b:
            assert [seq_of(m) for m in collect(b, 1)] == [1]
            b.send(0, frames_of(2))
            assert [seq_of(m) for m in collect(a, 1)] == [2]


def test_identity_prefix_goes_on_the_routing_id_and_off_for_rank_of(
    make: Callable[..., Transport],
) -> None:
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb}, identity_prefix="run-x/")
    b = make(1, pb, {0: pa}, identity_prefix="run-x/")
    a.send(1, frames_of(5))
    (got,) = collect(b, 1)
    assert seq_of(got) == 5 and got.peer_identity.startswith(b"run-x/0:")
    assert b.rank_of(got) == 0


def test_full_queue_drops_oldest_until_peer_appears(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    gossip = GossipConfig(heartbeat_s=0.1, peer_timeout_s=1.0, queue_messages=3)
    a = make(0, pa, {1: pb}, gossip=gossip)
    for seq in range(6):
        assert a.send(1, frames_of(seq))
    assert eventually(lambda: a.stats().dropped == {"queue_full": 3})
    b = make(1, pb, {0: pa})
    assert sorted(seq_of(m) for m in collect(b, 3)) == [3, 4, 5]


def test_close_is_prompt_with_an_unreachable_peer(make: Callable[..., Transport]) -> None:
    a = make(0, free_port(), {1: free_port()})
    for seq in range(20):
        a.send(1, frames_of(seq, size=10_000))
    start = time.monotonic()
    a.close(timeout_s=2.0)
    assert time.monotonic() - start < 1.0
    with pytest.raises(TransportError, match="closed"):
        a.send(1, frames_of(0))


def test_restarted_peer_receives_again(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a, b = make(0, pa, {1: pb}), make(1, pb, {0: pa})
    a.send(1, frames_of(1))
    assert len(collect(b, 1)) == 1
    b.close()
    b2 = make(1, pb, {0: pa})
    got: list[Inbound] = []
    deadline = time.monotonic() + 10.0
    while not got and time.monotonic() < deadline:
        a.send(1, frames_of(2))
        got = collect(b2, 1, timeout_s=0.2)
    assert got and seq_of(got[0]) == 2


def test_silence_counts_from_when_the_peer_goes(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb})
    assert a.silent_s(1) == float("inf")  # never seen
    b = make(1, pb, {0: pa})
    assert eventually(lambda: a.silent_s(1) == 0.0)  # connected, nothing sent either way
    b.close()
    closed = time.monotonic()
    assert eventually(lambda: a.silent_s(1) > 0.0)
    assert a.silent_s(1) <= time.monotonic() - closed + 0.05
    with pytest.raises(ValueError, match="not one of this node's peers"):
        a.silent_s(5)


def test_a_peer_that_reconnects_before_its_old_connection_is_gone_is_heard(
    make: Callable[..., Transport], raw_context: zmq.Context
) -> None:
    """A DEALER keeps its routing id across reconnects, and its new connection can come up
    while this node still holds the old one (a peer resumed from SIGSTOP times out first)."""
    port = free_port()
    a = make(0, port, {1: free_port()})
    old, new = raw_context.socket(zmq.DEALER), raw_context.socket(zmq.DEALER)
    for dealer in (old, new):
        dealer.linger, dealer.identity = 0, b"1:5ca1ab1e"
    old.reconnect_ivl = -1  # once cut it stays down, as a connection its peer has given up
    old.connect(url(port))
    old.send_multipart(frames_of(1))  # the old connection is the one known by this routing id
    (first,) = collect(a, 1)
    assert (a.rank_of(first), seq_of(first)) == (1, 1)
    new.connect(url(port))
    for seq in (2, 3):
        new.send_multipart(frames_of(seq))
    got = collect(a, 2, timeout_s=5.0)
    old.close()
    new.send_multipart(frames_of(4))
    got += collect(a, 1, timeout_s=5.0)
    assert [a.rank_of(m) for m in got] == [1, 1, 1]
    assert [seq_of(m) for m in got] == [2, 3, 4]


PEER_PROCESS = """
import sys
from gossipdqn.config import FaultsConfig, GossipConfig, SecurityConfig
from gossipdqn.net.transport import Transport
gossip = GossipConfig(heartbeat_s=0.1, peer_timeout_s=1.0, queue_messages=8)
with Transport(1, sys.argv[1], {0: sys.argv[2]}, gossip, SecurityConfig(), FaultsConfig()):
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_a_hung_peer_process_goes_silent_and_comes_back(make: Callable[..., Transport]) -> None:
    """ZeroMQ heartbeats, not messages, keep a peer alive: a stopped process stops answering."""
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb})
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER_PROCESS, url(pb), url(pa)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout is not None and peer.stdout.readline() == "ready\n"
        assert eventually(lambda: a.silent_s(1) == 0.0)
        peer.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert eventually(lambda: a.silent_s(1) > GOSSIP.peer_timeout_s)
        assert time.monotonic() - stopped >= GOSSIP.peer_timeout_s
        peer.send_signal(signal.SIGCONT)
        assert eventually(lambda: a.silent_s(1) == 0.0)
    finally:
        peer.send_signal(signal.SIGCONT)
        peer.kill()
        peer.wait()


def test_inbound_queue_drops_oldest(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a, b = make(0, pa, {1: pb}), make(1, pb, {0: pa}, inbound_limit=2)
    for seq in range(5):
        a.send(1, frames_of(seq))
    assert eventually(lambda: b.stats().messages_received == 5)
    assert [seq_of(m) for m in b.receive()] == [3, 4]
    assert b.stats().dropped == {"inbound_full": 3}
    assert not b.wait(0)


def test_drop_prob_one_drops_everything(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb}, faults=FaultsConfig(drop_prob=1.0))
    b = make(1, pb, {0: pa})
    assert not any(a.send(1, frames_of(seq)) for seq in range(10))
    assert a.stats().dropped == {"fault_drop": 10}
    assert not b.wait(0.3)


def test_partition_cuts_then_heals(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb}, faults=FaultsConfig(partition=("0-0.5:0|1,2",)))
    b = make(1, pb, {0: pa})
    start = time.monotonic()
    assert not a.send(1, frames_of(1))
    assert a.stats().dropped == {"partition": 1}
    assert b.send(0, frames_of(2))  # the window is per sender: b has no partition configured
    assert len(collect(a, 1)) == 1
    time.sleep(max(0.0, 0.55 - (time.monotonic() - start)))  # a clock window, not an event
    assert a.send(1, frames_of(3))
    assert [seq_of(m) for m in collect(b, 1)] == [3]


def test_delay_holds_messages_on_the_io_thread(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    a = make(0, pa, {1: pb}, faults=FaultsConfig(delay_ms=200.0))
    b = make(1, pb, {0: pa})
    start = time.monotonic()
    assert a.send(1, frames_of(1))
    assert time.monotonic() - start < 0.05  # the caller never waits
    (got,) = collect(b, 1)
    assert got.received_at - start >= 0.19


def test_byte_budget_paces_sends(make: Callable[..., Transport]) -> None:
    pa, pb = free_port(), free_port()
    gossip = GossipConfig(heartbeat_s=0.1, peer_timeout_s=1.0, max_bytes_per_s=100_000)
    b = make(1, pb, {0: pa})
    a = make(0, pa, {1: pb}, gossip=gossip)
    start = time.monotonic()
    for seq in range(4):
        a.send(1, frames_of(seq, size=10_000))  # ~40 kB each: 100 kB burst, then 0.2 s wait
    got = collect(b, 4)
    assert [seq_of(m) for m in got] == [0, 1, 2, 3]
    assert got[-1].received_at - start >= 0.15


def test_second_bind_on_a_port_fails_clearly(make: Callable[..., Transport]) -> None:
    port = free_port()
    make(0, port, {})
    with pytest.raises(TransportError, match="cannot open its sockets"):
        make(1, port, {})


def test_a_non_loopback_bind_without_keys_refuses_by_default(
    make: Callable[..., Transport],
) -> None:
    with pytest.raises(SecurityError, match="refusing to bind tcp://0.0.0.0.*insecure=true"):
        make(0, 0, {}, bind=f"tcp://0.0.0.0:{free_port()}")
    insecure = make(
        0, 0, {}, bind=f"tcp://0.0.0.0:{free_port()}", security=SecurityConfig(insecure=True)
    )
    assert insecure.insecure and not make(1, free_port(), {}).insecure


def test_unknown_peer_and_self_peer_are_errors(make: Callable[..., Transport]) -> None:
    a = make(0, free_port(), {1: free_port()})
    with pytest.raises(ValueError, match="not one of this node's peers"):
        a.send(3, frames_of(0))
    with pytest.raises(ValueError, match="lists itself"):
        Transport(0, url(1), {0: url(2)}, GOSSIP, NO_SECURITY, NO_FAULTS)


def test_partition_entries_are_validated() -> None:
    part = parse_partition("1.5-3:0,1|2")
    assert part.cuts(0, 2, 2.0) and not part.cuts(0, 1, 2.0) and not part.cuts(0, 2, 3.0)
    assert not part.cuts(0, 9, 2.0)  # unlisted ranks are never cut
    for bad in ["1-3", "3-1:0|1", "a-3:0|1", "0-3:0,1", "0-3:0|0", "0-3:0|x", "-1-3:0|1"]:
        with pytest.raises(ValueError, match="faults.partition .*expected"):
            parse_partition(bad)


def test_outbox_holds_delayed_messages_until_due() -> None:
    injector = FaultInjector(FaultsConfig(delay_ms=100.0), rank=0)
    box = Outbox([1], limit=2, max_bytes_per_s=0.0, injector=injector, now=0.0)
    assert box.put(1, [b"a"], 1, now=0.0, elapsed_s=0.0)
    assert box.take(1, now=0.05) == (None, pytest.approx(0.05))
    item, wait_s = box.take(1, now=0.1)
    assert item is not None and item.frames == [b"a"] and wait_s == 0.0
    assert box.take(1, now=0.2) == (None, float("inf"))


def test_outbox_budget_waits_then_drops_oldest_as_budget() -> None:
    injector = FaultInjector(FaultsConfig(), rank=0)
    box = Outbox([1], limit=1, max_bytes_per_s=100.0, injector=injector, now=0.0)
    box.put(1, [b"a"], 150, now=0.0, elapsed_s=0.0)
    item, _ = box.take(1, now=0.0)
    assert item is not None
    box.sent(1, item)  # 100 tokens - 150 bytes: 0.5 s of debt
    box.put(1, [b"b"], 10, now=0.1, elapsed_s=0.1)
    assert box.take(1, now=0.1) == (None, pytest.approx(0.4))
    box.put(1, [b"c"], 10, now=0.2, elapsed_s=0.2)
    assert box.dropped() == {"budget": 1} and box.queued(1) == 1
    item, wait_s = box.take(1, now=0.51)
    assert item is not None and item.frames == [b"c"] and wait_s == 0.0


# --- CURVE -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("curve")
    generate_keys(directory, 2)
    return directory


@pytest.fixture
def curve_pair(
    make: Callable[..., Transport], keys_dir: Path
) -> tuple[Transport, Transport, int, int]:
    pa, pb = free_port(), free_port()
    security = SecurityConfig(keys_dir=str(keys_dir))
    a = make(0, pa, {1: pb}, security=security)
    b = make(1, pb, {0: pa}, security=security)
    return a, b, pa, pb


def assert_still_exchanging(a: Transport, b: Transport) -> None:
    a.send(1, frames_of(42))
    got = collect(b, 1)
    assert [seq_of(m) for m in got] == [42] and b.rank_of(got[0]) == 0


def test_curve_peers_exchange_and_prove_identity(curve_pair, keys_dir: Path) -> None:
    a, b, _, _ = curve_pair
    a.send(1, frames_of(1))
    b.send(0, frames_of(2))
    (at_b,), (at_a,) = collect(b, 1), collect(a, 1)
    assert at_b.user_id == load_node_keys(keys_dir, 0).public.decode()
    assert (b.rank_of(at_b), a.rank_of(at_a)) == (0, 1)
    assert b.peer_ranks[load_node_keys(keys_dir, 1).public] == 1


def test_curve_stranger_key_is_refused(
    curve_pair, make: Callable[..., Transport], keys_dir: Path, tmp_path: Path
) -> None:
    a, b, _, pb = curve_pair
    generate_keys(tmp_path, 3)  # the stranger knows b's public key but b does not know its key
    shutil.copyfile(keys_dir / "authorized" / "node-1.key", tmp_path / "authorized" / "node-1.key")
    assert "zap_denied" not in b.stats().dropped
    stranger = make(2, free_port(), {1: pb}, security=SecurityConfig(keys_dir=str(tmp_path)))
    for seq in range(3):
        stranger.send(1, frames_of(100 + seq))
    assert eventually(lambda: b.stats().dropped.get("zap_denied", 0) > 0), b.stats()
    assert not b.receive()
    assert_still_exchanging(a, b)


@pytest.mark.parametrize("curve_server", [False, True])
def test_curve_plain_client_is_refused(
    make: Callable[..., Transport], keys_dir: Path, raw_context: zmq.Context, curve_server: bool
) -> None:
    pa, pb = free_port(), free_port()
    security = SecurityConfig(keys_dir=str(keys_dir)) if curve_server else NO_SECURITY
    a, b = make(0, pa, {1: pb}, security=security), make(1, pb, {0: pa}, security=security)
    plain, monitor = dial(raw_context, url(pb))
    plain.send_multipart(frames_of(7), copy=False)
    outcome = handshake_outcome(monitor)
    if not curve_server:  # the same client is let in by a node without CURVE
        assert outcome == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert [seq_of(m) for m in collect(b, 1)] == [7]
        return
    assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED
    assert not b.receive()
    assert_still_exchanging(a, b)
    plain.disable_monitor()
    monitor.close(linger=0)
    plain.close(linger=0)


def zmtp1_junk(count: int, seed: int) -> bytes:
    """Bytes that ZMTP/1.0 reads as an empty identity, then `count` one-frame messages of
    random bytes (each its length, a flags byte, the body)."""
    rng = random.Random(seed)
    out = bytearray(b"\x01\x00")
    for _ in range(count):
        body = rng.randbytes(rng.randrange(1, 200))
        out += bytes([len(body) + 1, 0]) + body
    return bytes(out)


@pytest.mark.parametrize("curve", [True, False])
def test_raw_garbage_on_the_port_delivers_nothing_decodable(
    make: Callable[..., Transport], keys_dir: Path, curve: bool
) -> None:
    pa, pb = free_port(), free_port()
    security = SecurityConfig(keys_dir=str(keys_dir)) if curve else NO_SECURITY
    a = make(0, pa, {1: pb}, security=security)
    b = make(1, pb, {0: pa}, security=security)
    junk = zmtp1_junk(6, seed=14)  # fewer than b's inbound queue holds
    with socket.create_connection(("127.0.0.1", pb), timeout=10.0) as raw:
        raw.sendall(junk)
        if curve:  # CURVE needs a ZMTP/3 handshake: the node hangs up on these bytes
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(4096):
                    pass
            assert not b.receive()
        else:  # libzmq still speaks ZMTP/1.0: all 6 arrive, and the codec refuses each one
            arrived = collect(b, 6)
            assert len(arrived) == 6 and all(_rejected(m) for m in arrived)
    assert_still_exchanging(a, b)
    assert b.stats().errors == 0


def _rejected(inbound: Inbound) -> bool:
    with pytest.raises(WireError):
        decode(inbound.frames, WireLimits(), run_id=None)
    return True
