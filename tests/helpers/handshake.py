"""The outcome of a client socket's ZeroMQ handshake, as its monitor reports it."""

from __future__ import annotations

import time
import uuid

import zmq
from zmq.utils.monitor import recv_monitor_message

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def handshake_outcome(monitor: zmq.Socket, timeout_s: float = 10.0) -> int:
    """The first handshake result (success, a failure, or a disconnect) `monitor` reports."""
    ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED}
    deadline = time.monotonic() + timeout_s
    while monitor.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        event = recv_monitor_message(monitor)["event"]
        if event in ends or event & HANDSHAKE_FAILED:
            return event
    raise AssertionError(f"no handshake outcome within {timeout_s} s")


def dial(
    context: zmq.Context, address: str, keys: tuple[bytes, bytes, bytes] | None = None
) -> tuple[zmq.Socket, zmq.Socket]:
    """A DEALER to `address` (CURVE with (server, public, secret) keys) and its monitor."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    monitor = sock.get_monitor_socket(addr=f"inproc://handshake-{uuid.uuid4().hex}")
    sock.connect(address)
    return sock, monitor
