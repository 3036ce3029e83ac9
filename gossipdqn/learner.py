"""The learner: online and target Q-networks, Adam, one TD update per `step`."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from gossipdqn.config import LearnerConfig, NetworkConfig
from gossipdqn.losses import td_loss, td_targets
from gossipdqn.networks import build_q_network
from gossipdqn.types import EnvSpec, SampledBatch


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when present, else cpu; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"learner.device: {name!r} asked for, but torch sees no CUDA device")
    return device


class UpdateResult(NamedTuple):
    """Scalars of one update and the new |TD errors| for the sampled slots."""

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
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.updates = 0
        self.gradient_handler: Callable[[Learner], None] | None = None
        """Replaces `apply_gradients` (all-reduce averages first, a PS worker sends them away)."""
        self.pin = self.device.type == "cuda"
        self.actor_net = (
            self.online if self.device.type == "cpu" else copy.deepcopy(self.online).cpu()
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def step(self, batch: SampledBatch) -> UpdateResult:
        """One gradient step on a sampled batch; refreshes the target net on its schedule."""
        obs, next_obs = self._to_device(batch.obs), self._to_device(batch.next_obs)
        actions = self._to_device(batch.actions)
        rewards, discounts = self._to_device(batch.rewards), self._to_device(batch.discounts)
        weights = self._to_device(batch.weights)
        with torch.no_grad():
            next_target = self.target(next_obs)
            next_online = self.online(next_obs) if self.cfg.double else None
            targets = td_targets(rewards, discounts, next_target, next_online)
        q_values = self.online(obs)
        q_taken = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
        loss, errors = td_loss(q_taken, targets, weights, self.cfg.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.gradient_handler is None:
            self.apply_gradients()
        else:
            self.gradient_handler(self)
        self.updates += 1
        self._update_target()
        stats = torch.stack([loss.detach(), q_taken.detach().mean()]).cpu().numpy()
        return UpdateResult(float(stats[0]), float(stats[1]), errors.detach().abs().cpu().numpy())

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
        """Copy the online weights into the actors' CPU net (a no-op when both are the CPU net)."""
        if self.actor_net is not self.online:
            self.actor_net.load_state_dict(self.online.state_dict())

    @torch.inference_mode()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q-values of the actors' net for a batch of observations (on the CPU)."""
        return self.actor_net(torch.from_numpy(np.asarray(obs))).numpy()

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
