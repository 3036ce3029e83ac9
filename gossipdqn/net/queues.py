"""The transport's queues without sockets: per-peer queues out and in, and a byte budget."""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gossipdqn.net.faults import FaultInjector


@dataclass(frozen=True)
class Outgoing:
    """A queued message: its frames, their total size, and when it may leave."""

    frames: list[Any]
    nbytes: int
    due: float


class TokenBucket:
    """Bytes per second with a one-second burst; a send may overdraw, later sends then wait."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.tokens, self.last = rate, rate, now

    def wait_s(self, now: float) -> float:
        """Seconds until the next send is allowed (0: now)."""
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate

    def spend(self, nbytes: int) -> None:
        """Take `nbytes` from the bucket."""
        self.tokens -= nbytes


class Outbox:
    """Per-peer FIFOs that drop their oldest when full; a message leaves when due and in budget."""

    def __init__(
        self,
        peers: Iterable[int],
        limit: int,
        max_bytes_per_s: float,
        injector: FaultInjector,
        now: float,
    ) -> None:
        self.limit, self.injector = limit, injector
        self._lock = threading.Lock()
        self._queues: dict[int, deque[Outgoing]] = {p: deque() for p in peers}
        self._buckets = {p: TokenBucket(max_bytes_per_s, now) for p in self._queues}
        self._throttled: set[int] = set()
        self._dropped: Counter[str] = Counter()

    def put(self, peer: int, frames: list[Any], nbytes: int, now: float, elapsed_s: float) -> bool:
        """Queue a message; False when a fault rule dropped it (counted)."""
        with self._lock:
            reason = self.injector.drop_reason(peer, elapsed_s)
            if reason is not None:
                self._dropped[reason] += 1
                return False
            queue = self._queues[peer]
            if len(queue) >= self.limit:
                queue.popleft()
                self._dropped["budget" if peer in self._throttled else "queue_full"] += 1
            queue.append(Outgoing(frames, nbytes, now + self.injector.delay_s))
            return True

    def take(self, peer: int, now: float) -> tuple[Outgoing | None, float]:
        """The next message that may leave now, or None and the seconds to wait (inf: empty)."""
        with self._lock:
            queue = self._queues[peer]
            if not queue:
                self._throttled.discard(peer)
                return None, math.inf
            if queue[0].due > now:
                return None, queue[0].due - now
            budget_wait = self._buckets[peer].wait_s(now)
            if budget_wait > 0:
                self._throttled.add(peer)
                return None, budget_wait
            self._throttled.discard(peer)
            return queue.popleft(), 0.0

    def sent(self, peer: int, item: Outgoing) -> None:
        """Charge a message that left to the peer's budget."""
        with self._lock:
            self._buckets[peer].spend(item.nbytes)

    def put_back(self, peer: int, item: Outgoing) -> None:
        """Return a message the socket refused, unless it is now the oldest of a full queue."""
        with self._lock:
            queue = self._queues[peer]
            if len(queue) >= self.limit:
                self._dropped["queue_full"] += 1
            else:
                queue.appendleft(item)

    def dropped(self) -> dict[str, int]:
        """Messages dropped so far, by reason."""
        with self._lock:
            return dict(self._dropped)

    def queued(self, peer: int | None = None) -> int:
        """Messages waiting for `peer`, or across all peers."""
        with self._lock:
            if peer is not None:
                return len(self._queues[peer])
            return sum(len(q) for q in self._queues.values())


class Inbox:
    """Per-sender FIFOs read round-robin; when full, the longest queue loses its oldest.

    A sender that floods only ever evicts its own messages, so honest peers keep arriving.
    Not locked: the transport holds its lock around every call.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queues: dict[bytes, deque[Any]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, sender: bytes, item: Any) -> bool:
        """Queue `item`; False when that evicted an older message (of the longest queue)."""
        self._queues.setdefault(sender, deque()).append(item)
        self._count += 1
        if self._count <= self.limit:
            return True
        longest = max(self._queues, key=lambda s: len(self._queues[s]))
        self._queues[longest].popleft()
        if not self._queues[longest]:
            del self._queues[longest]
        self._count -= 1
        return False

    def take(self, max_items: int) -> list[Any]:
        """Up to `max_items`, one sender at a time in turn, each sender's oldest first."""
        out: list[Any] = []
        while self._count and len(out) < max_items:
            sender = next(iter(self._queues))
            queue = self._queues.pop(sender)
            out.append(queue.popleft())
            self._count -= 1
            if queue:
                self._queues[sender] = queue
        return out
