"""Q-networks: an MLP with an optional dueling head."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from gossipdqn.config import NetworkConfig
from gossipdqn.types import EnvSpec


class QNetwork(nn.Module):
    """Maps a batch of observations to one Q-value per action."""

    def __init__(self, spec: EnvSpec, cfg: NetworkConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec.obs_shape)
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.dueling = cfg.dueling
        self.advantage = nn.Linear(width, spec.n_actions)
        self.value = nn.Linear(width, 1) if cfg.dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features = self.body(obs.float())
        advantage = self.advantage(features)
        if self.value is None:
            return advantage
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


def build_q_network(spec: EnvSpec, cfg: NetworkConfig) -> QNetwork:
    """The Q-network for an environment of this spec."""
    return QNetwork(spec, cfg)


def fingerprint(net: nn.Module) -> str:
    """A short hash of parameter names, shapes and dtypes: peers must agree on it to mix."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in net.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
