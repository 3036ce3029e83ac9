"""Q-networks: an MLP, the Nature DQN CNN and the MinAtar CNN, with an optional dueling head."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from gossipdqn.config import NetworkConfig
from gossipdqn.types import EnvSpec


class ScaleFrames(nn.Module):
    """uint8 frames (stack, H, W) to floats in [0, 1]."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float() / 255.0


class ChannelsFirst(nn.Module):
    """MinAtar grids (H, W, C) of bools to floats (C, H, W)."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float().permute(0, 3, 1, 2)


def _mlp(spec: EnvSpec, cfg: NetworkConfig) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(spec.obs_shape)
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers), width


def _nature_cnn(spec: EnvSpec) -> tuple[nn.Sequential, int]:
    """Mnih et al. (2015): three conv layers and a 512-unit layer over 84x84 frame stacks."""
    channels, height, width = spec.obs_shape
    convs = nn.Sequential(
        nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(),
    )  # fmt: skip
    flat = _flat_size(convs, (channels, height, width))
    return nn.Sequential(ScaleFrames(), convs, nn.Linear(flat, 512), nn.ReLU()), 512


def _minatar_cnn(spec: EnvSpec) -> tuple[nn.Sequential, int]:
    """Young & Tian (2019): one 3x3 conv of 16 channels and a 128-unit layer over 10x10 grids."""
    height, width, channels = spec.obs_shape
    convs = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
    flat = _flat_size(convs, (channels, height, width))
    return nn.Sequential(ChannelsFirst(), convs, nn.Linear(flat, 128), nn.ReLU()), 128


def _flat_size(convs: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(convs(torch.zeros(1, *shape)).shape[1])


def network_kind(spec: EnvSpec, kind: str) -> str:
    """Resolve 'auto': Nature CNN for uint8 84x84 stacks, MinAtar CNN for 10x10 grids, else MLP."""
    if kind != "auto":
        return kind
    shape = spec.obs_shape
    if spec.obs_dtype == np.uint8 and len(shape) == 3 and shape[1:] == (84, 84):
        return "nature_cnn"
    if len(shape) == 3 and shape[:2] == (10, 10):
        return "minatar_cnn"
    return "mlp"


def _body(spec: EnvSpec, cfg: NetworkConfig) -> tuple[nn.Sequential, int]:
    kind = network_kind(spec, cfg.kind)
    if kind != "mlp" and len(spec.obs_shape) != 3:
        raise ValueError(f"network.kind: {kind} needs 3-D observations, got {spec.obs_shape}")
    if kind == "nature_cnn":
        return _nature_cnn(spec)
    if kind == "minatar_cnn":
        return _minatar_cnn(spec)
    return _mlp(spec, cfg)


class QNetwork(nn.Module):
    """Maps a batch of observations to one Q-value per action."""

    def __init__(self, spec: EnvSpec, cfg: NetworkConfig) -> None:
        super().__init__()
        self.body, width = _body(spec, cfg)
        self.frames = network_kind(spec, cfg.kind) == "nature_cnn"
        self.dueling = cfg.dueling
        self.advantage = nn.Linear(width, spec.n_actions)
        self.value = nn.Linear(width, 1) if cfg.dueling else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features = self.body(obs if self.frames else obs.float())
        advantage = self.advantage(features)
        if self.value is None:
            return advantage
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


def build_q_network(spec: EnvSpec, cfg: NetworkConfig) -> QNetwork:
    """The Q-network for an environment of this spec."""
    return QNetwork(spec, cfg)


def flat_parameters_(net: nn.Module) -> torch.Tensor:
    """Move every parameter of `net` into one contiguous vector and return it.

    The parameters become views of the vector, so a snapshot is one copy, validation one pass
    and a gossip mix one fused op over the whole model; optimizers and state dicts see no change.
    Call it after the net is on its device and before anything keeps references to the old data.
    """
    params = list(net.parameters())
    dtypes = {(p.dtype, p.device) for p in params}
    if len(dtypes) != 1:
        found = sorted(map(str, dtypes))
        raise ValueError(f"flat parameters need one dtype and device, got {found}")
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    return flat


def fingerprint(net: nn.Module) -> str:
    """A short hash of parameter names, shapes and dtypes: peers must agree on it to mix."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in net.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]
