"""The learner: online and target Q-networks, Adam, one TD update per `step`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import queue
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from gossipdqn.config import LearnerConfig, NetworkConfig
from gossipdqn.dqn.losses import td_loss, td_targets
from gossipdqn.dqn.networks import build_q_network, flat_parameters_
from gossipdqn.types import EnvSpec, SampledBatch


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when present, else cpu; anything else is taken as given. A cuda device
    always carries its index (the one tensors report), so devices compare equal to theirs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"learner.device: {name!r} asked for, but torch sees no CUDA device")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """Updates owed at `per_step` updates per env step once `learning_starts` env steps are
    collected from the origin: the run's start, or a resume that found no saved replay."""

    learning_starts: int
    per_step: float
    origin_steps: int = 0
    origin_updates: int = 0

    def due(self, env_steps: int, updates: int) -> int:
        """How many updates are due after `env_steps` env steps when `updates` are done."""
        start = self.origin_steps + self.learning_starts
        if env_steps < start:
            return 0
        return max(0, self.origin_updates + int((env_steps - start) * self.per_step) - updates)

    def restarted(self, env_steps: int, updates: int) -> UpdateSchedule:
        """The schedule of a run that goes on from these counters with an empty replay."""
        return dataclasses.replace(self, origin_steps=env_steps, origin_updates=updates)


class UpdateResult(NamedTuple):
    """Scalars of one update and the new |TD errors| for the sampled slots.

    With `learner.metrics_every` N > 1, `loss` and `mean_q` are the means over the last N updates
    on every N-th update and NaN between; `td_errors` is empty when the caller did not ask.
    """

    loss: float
    mean_q: float
    td_errors: np.ndarray


class Learner:
    """Double/plain DQN updates on minibatches; `step(batch)` is one gradient step."""

    def __init__(
        self, spec: EnvSpec, net_cfg: NetworkConfig, cfg: LearnerConfig, *, seed: int
    ) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.online = build_q_network(spec, net_cfg).to(self.device)
        self.online_flat = flat_parameters_(self.online)
        """Every online parameter is a view of this one vector (what gossip snapshots and mixes)."""
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.updates = 0
        self.gradient_handler: Callable[[Learner], None] | None = None
        """Replaces `apply_gradients` (all-reduce averages first, a PS worker sends them away)."""
        self.actor_net = copy.deepcopy(self.online).requires_grad_(False)
        """What in-process actors and evaluations act with: a copy of the online net on the same
        device, on every device, refreshed after every update and every load or mix."""
        self.actor_flat = flat_parameters_(self.actor_net)
        self.loss_fn = torch.compile(self._loss) if cfg.compile else self._loss
        self.stats = torch.zeros(2, device=self.device)

    def to_device(self, batch: SampledBatch) -> SampledBatch:
        """The batch as tensors on the learner's device (via pinned memory); `sampled_at` and
        `indices` stay here, for `update_priorities`."""
        *arrays, sampled_at, indices = batch
        return SampledBatch(*(_to_device(a, self.device) for a in arrays), sampled_at, indices)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when `learner.bf16`, else nothing (not even a disabled autocast)."""
        if self.cfg.bf16:
            return torch.autocast(self.device.type, torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch: SampledBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted TD loss, TD errors, mean Q of the taken actions) of a device batch."""
        with self.autocast():
            with torch.no_grad():
                next_target = self.target(batch.next_obs).float()
                next_online = self.online(batch.next_obs).float() if self.cfg.double else None
                targets = td_targets(batch.rewards, batch.discounts, next_target, next_online)
            q_values = self.online(batch.obs).float()
        q_taken = q_values.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        loss, errors = td_loss(q_taken, targets, batch.weights, self.cfg.loss)
        return loss, errors, q_taken.detach().mean()

    def follow_lr_schedule(self, env_steps: int) -> float:
        """Set and return the learning rate for this many env steps (the linear decay)."""
        cfg = self.cfg
        frac = min(1.0, env_steps / cfg.lr_decay_steps) if cfg.lr_decay_steps else 0.0
        lr = cfg.lr + frac * (cfg.lr_end - cfg.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, batch: SampledBatch, *, td_errors: bool = True) -> UpdateResult:
        """One gradient step on a sampled batch; refreshes the target net on its schedule.

        Raises FloatingPointError, before counting the update, when the loss or a TD error
        it brings to the host is not finite (the node stops; its last checkpoint is intact).
        """
        loss, errors, mean_q = self.loss_fn(self.to_device(batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_handler is None:
            self.apply_gradients()
        else:
            self.gradient_handler(self)
        errors = errors.detach().abs().cpu().numpy() if td_errors else np.zeros(0, np.float32)
        every = self.cfg.metrics_every
        synced = (self.updates + 1) % every == 0  # loss and mean Q reach the host this update
        if every == 1:
            result = UpdateResult(loss.item(), mean_q.item(), errors)
        else:
            self.stats += torch.stack([loss.detach(), mean_q])
            result = UpdateResult(math.nan, math.nan, errors)
            if synced:
                stats = (self.stats / every).cpu().numpy()
                self.stats.zero_()
                result = UpdateResult(float(stats[0]), float(stats[1]), errors)
        if (synced and not math.isfinite(result.loss)) or not np.isfinite(errors).all():
            raise FloatingPointError(
                f"learner diverged: TD loss is {result.loss} at update {self.updates + 1} "
                f"({int((~np.isfinite(errors)).sum())} of {len(errors)} TD errors not finite); "
                "its parameters are lost, so resume from the last checkpoint with a lower "
                f"learner.lr (now {self.optimizer.param_groups[0]['lr']:g}) or max_grad_norm"
            )
        self.updates += 1
        self._update_target()
        self.sync_actor_net()
        return result

    def apply_gradients(self) -> None:
        """Clip the online net's gradients and take one optimizer step."""
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()

    def _update_target(self) -> None:
        if self.cfg.target_update == "polyak":
            with torch.no_grad():
                torch._foreach_lerp_(
                    list(self.target.parameters()), list(self.online.parameters()), self.cfg.tau
                )
        elif self.updates % self.cfg.target_every == 0:
            self.target.load_state_dict(self.online.state_dict())

    def sync_actor_net(self) -> None:
        """Refresh the acting copy from the online net: one flat-vector copy on the device."""
        with torch.no_grad():
            self.actor_flat.copy_(self.online_flat)

    @torch.inference_mode()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q-values of the acting copy for a batch of observations, as a host array."""
        q = self.actor_net(torch.from_numpy(np.asarray(obs)).to(self.device))
        return q.float().cpu().numpy()

    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self.sync_actor_net()


def _to_device(value: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class Prefetcher:
    """Samples the next batches and copies them to the device in a thread while updates run."""

    def __init__(
        self, sample: Callable[[], SampledBatch], learner: Learner, *, depth: int = 2
    ) -> None:
        self.sample, self.learner = sample, learner
        self.ready: queue.Queue[SampledBatch | BaseException] = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                item: SampledBatch | BaseException = self.learner.to_device(self.sample())
            except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
                item = e
            while not self.stopping.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self, timeout_s: float = 60.0) -> SampledBatch:
        """The next device batch; re-raises what the sampling thread raised."""
        item = self.ready.get(timeout=timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5.0)
