"""Host buffers for parameter snapshots, reused once ZeroMQ has let go of them.

Parameters leave without a copy, so a snapshot's buffer is in use until ZeroMQ has written it
to every peer; pyzmq's message trackers say when that is. Reusing buffers spares the page faults
of a fresh multi-megabyte allocation every round, which cost more than the copy itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import zmq


@dataclass
class Snapshot:
    """A copy of the parameters: `host` to encode, `frame` (the same bytes) to send."""

    host: torch.Tensor
    frame: zmq.Frame


class SnapshotPool:
    """Up to `limit` reusable snapshot buffers shaped like `flat` (pinned when it is on a GPU)."""

    def __init__(self, flat: torch.Tensor, limit: int = 4) -> None:
        self.numel, self.dtype, self.limit = flat.numel(), flat.dtype, limit
        self.pinned = flat.is_cuda
        self._buffers: list[tuple[torch.Tensor, zmq.MessageTracker]] = []

    def __len__(self) -> int:
        """Buffers kept for reuse."""
        return len(self._buffers)

    def capture(self, flat: torch.Tensor) -> Snapshot:
        """Copy `flat` into a free buffer (a new one when every buffer is still being sent)."""
        index = next((i for i, (_, t) in enumerate(self._buffers) if t.done), None)
        if index is None:
            host = torch.empty(self.numel, dtype=self.dtype, pin_memory=self.pinned)
        else:
            host = self._buffers[index][0]
        host.copy_(flat.detach().reshape(-1))
        frame = zmq.Frame(host.numpy(), copy=False, track=True)
        if index is not None:
            self._buffers[index] = (host, frame.tracker)
        elif len(self._buffers) < self.limit:
            self._buffers.append((host, frame.tracker))
        return Snapshot(host, frame)
