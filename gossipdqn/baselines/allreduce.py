"""Synchronous data parallelism: every update's gradients averaged over all workers.

Each worker is an ordinary node whose learner hands its gradients to `torch.distributed`
(gloo on CPU, nccl on GPU); the averaged gradients then take the usual clip + Adam step, so
parameters stay bit-identical across workers. Rank 0's address of the peer list hosts the TCP
rendezvous store (the MASTER_ADDR:MASTER_PORT of torch.distributed). Workers update in lockstep,
so a worker that stops early, or dies, ends the collective for everyone: the others stop with
a clear error.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from gossipdqn.baselines import ExchangeLost
from gossipdqn.learner import Learner
from gossipdqn.mixing import flatten, unflatten_into
from gossipdqn.replay import ReplayBuffer
from gossipdqn.types import Transitions


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

    def _average(self, learner: Learner) -> None:
        """The gradient handler: sum over workers, divide by their number, clip + Adam step."""
        if self.lost is not None:
            return
        grads = [p.grad for p in self.params]
        flat = flatten(grads)
        started = time.perf_counter()
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistError) as e:
            self.lost = f"all-reduce failed: a worker left or died ({_first_line(e)})"
            self.stop.set()
            return
        self.reduce_s += time.perf_counter() - started
        self.reduces += 1
        self.nbytes = flat.numel() * flat.element_size()
        flat /= self.world
        unflatten_into(flat, grads)
        learner.apply_gradients()

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
            "sent_bytes": int(ring), "recv_bytes": int(ring),
            "sent_bytes_per_s": ring / elapsed, "recv_bytes_per_s": ring / elapsed,
            "allreduce_lost": self.lost or "",
        }  # fmt: skip

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
