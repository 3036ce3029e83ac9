"""Synchronous data parallelism: every update's gradients averaged over all workers.

Each worker is an ordinary node whose learner hands its gradients to `torch.distributed`
(gloo on CPU, nccl on GPU); the averaged gradients then take the usual clip + Adam step, so
parameters stay bit-identical across workers (checked every CHECK_EVERY updates). Rank 0's
address of the peer list hosts the TCP rendezvous store (torch's MASTER_ADDR:MASTER_PORT).
Each all-reduce also counts the workers still training: one that reaches its budget first
keeps taking part, with no gradients of its own, until all are done, so uneven env-step counts
end cleanly. A worker that dies ends the collective for everyone: the others stop with a clear
error.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from gossipdqn.baselines import ExchangeLost
from gossipdqn.dqn.learner import Learner
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.gossip.mixing import flatten, unflatten_into
from gossipdqn.types import Transitions

CHECK_EVERY = 100
"""All-reduces between checks that every worker's parameters equal rank 0's, bit for bit."""


class AllReduceExchange:
    """Averages gradients with an all-reduce each update (implements node.Exchange)."""

    def __init__(
        self, rank: int, world: int, master: str, stop: threading.Event, *, timeout_s: float
    ) -> None:
        self.rank, self.world, self.master, self.stop = rank, world, master, stop
        self.timeout_s = timeout_s
        self.lost: str | None = None
        self.reduces = 0
        self.reduce_s = 0.0
        self.checks = 0
        self.mismatches = 0
        self.nbytes = 0
        self.started = time.monotonic()
        self.learner: Learner | None = None

    def attach(self, learner: Learner, replay: ReplayBuffer) -> None:
        """Join the process group; every worker starts from rank 0's networks."""
        backend = "nccl" if learner.device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend, init_method=f"tcp://{self.master}", rank=self.rank,
                world_size=self.world, timeout=datetime.timedelta(seconds=self.timeout_s),
            )  # fmt: skip
        except (RuntimeError, dist.DistError) as e:
            raise ExchangeLost(
                f"cannot form the all-reduce group of {self.world} at {self.master} within "
                f"{self.timeout_s:g} s ({_first_line(e)}); expected every rank started"
            ) from None
        with torch.no_grad():
            for net in (learner.online, learner.target):
                for tensor in net.state_dict().values():
                    dist.broadcast(tensor, src=0)
        learner.sync_actor_net()
        self.learner = learner
        self.params = list(learner.online.parameters())
        learner.gradient_handler = self._average

    def _reduce(self, flat: torch.Tensor, active: bool) -> tuple[torch.Tensor, int]:
        """Sum `flat` over workers with one more slot counting the workers still training."""
        buf = torch.cat([flat, flat.new_ones(1) if active else flat.new_zeros(1)])
        started = time.perf_counter()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.reduce_s += time.perf_counter() - started
        self.reduces += 1
        self.nbytes = buf.numel() * buf.element_size()
        if self.reduces % CHECK_EVERY == 0:
            self._check_identical()
        return buf[:-1], int(buf[-1].item())

    def _check_identical(self) -> None:
        """Compare this worker's parameters with rank 0's, bit for bit."""
        theta = flatten(self.params)
        reference = theta.clone()
        dist.broadcast(reference, src=0)
        self.checks += 1
        self.mismatches += not torch.equal(theta, reference)

    def _apply(self, summed: torch.Tensor, active: int) -> None:
        grads = [p.grad for p in self.params]
        unflatten_into(summed / active, grads)
        assert self.learner is not None
        self.learner.apply_gradients()

    def _average(self, learner: Learner) -> None:
        """The gradient handler: the mean over training workers, then clip + Adam step."""
        if self.lost is not None:
            return
        try:
            summed, active = self._reduce(flatten([p.grad for p in self.params]), True)
        except (RuntimeError, dist.DistError) as e:
            self.lost = f"all-reduce failed: a worker left or died ({_first_line(e)})"
            self.stop.set()
            return
        self._apply(summed, active)

    def _drain(self) -> None:
        """A worker done early takes part (with no gradients) until every worker is done."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        zeros = flatten([p.grad for p in self.params]).zero_()
        while True:
            try:
                summed, active = self._reduce(zeros, False)
            except (RuntimeError, dist.DistError):
                return
            if active == 0:
                return
            self._apply(summed, active)

    def rendezvous(self, stop: threading.Event) -> None:
        """Nothing more to wait for: attach formed the process group, every worker in it."""

    def after_env_step(self, env_steps: int, transitions: Transitions) -> None:
        """Nothing to do between updates."""

    def after_update(self, updates: int) -> None:
        """Nothing to do: the handler did the work."""

    def metrics(self) -> dict[str, Any]:
        """All-reduces, their time, and the bytes a ring all-reduce moves per worker."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        ring = 2 * (self.world - 1) / self.world * self.nbytes * self.reduces
        return {
            "allreduce_count": self.reduces, "allreduce_s": self.reduce_s,
            "identity_checks": self.checks, "identity_mismatches": self.mismatches,
            "sent_bytes": int(ring), "recv_bytes": int(ring),
            "sent_bytes_per_s": ring / elapsed, "recv_bytes_per_s": ring / elapsed,
            "allreduce_lost": self.lost or "",
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Nothing: a resumed worker starts again from rank 0's parameters."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""

    def close(self) -> None:
        """Wait for the other workers to finish their updates, then leave the group."""
        if dist.is_initialized():
            if self.lost is None and self.learner is not None:
                self._drain()
            dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
