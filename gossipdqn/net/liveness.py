"""Which peers are alive, as the transport's I/O thread sees them, however busy the node's loop is.

A peer counts as alive while this node's connection to it is up: ZeroMQ heartbeats (PING every
`gossip.heartbeat_s`, the connection dropped when no answer comes within `gossip.peer_timeout_s`)
are answered by the peer's own I/O threads, so they stop only when its process dies, hangs or
is cut off, never because its learner is busy. A message that arrives from a peer is a sign of
life too. A killed peer is silent from the moment its connection drops; a hung one from when
its heartbeats time out.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable


class Liveness:
    """Each peer's connection state and last sign of life; the I/O thread writes, any reads."""

    def __init__(self, peers: Iterable[int]) -> None:
        self._lock = threading.Lock()
        self._up = {peer: False for peer in peers}
        self._last: dict[int, float] = {}

    def connected(self, peer: int, now: float) -> None:
        """The connection to `peer` came up (its handshake succeeded)."""
        with self._lock:
            self._up[peer], self._last[peer] = True, now

    def disconnected(self, peer: int, now: float) -> None:
        """The connection to `peer` went down; its silence counts from now."""
        with self._lock:
            if self._up[peer]:
                self._up[peer], self._last[peer] = False, now

    def heard(self, peer: int, now: float) -> None:
        """A message from `peer` arrived (a rank that is not a peer of this node is ignored)."""
        with self._lock:
            if peer in self._up:
                self._last[peer] = max(now, self._last.get(peer, now))

    def silent_s(self, peer: int, now: float) -> float:
        """Seconds since `peer` was last known alive: 0.0 while connected, inf if it never was."""
        with self._lock:
            if self._up[peer]:
                return 0.0
            last = self._last.get(peer)
            return math.inf if last is None else max(0.0, now - last)
