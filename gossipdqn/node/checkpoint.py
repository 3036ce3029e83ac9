"""Checkpoints: plain state dicts written atomically and loaded with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from gossipdqn.config import Config, config_from_dict
from gossipdqn.dqn.envs import make_vector_env, spec_of
from gossipdqn.dqn.evaluate import evaluate
from gossipdqn.dqn.learner import Learner
from gossipdqn.types import EvalResult

CHECKPOINT_NAME = "checkpoint.pt"
"""A node's checkpoint file inside its run dir."""
_NUMPY_TAG = "__numpy__"


def _to_storable(value: Any) -> Any:
    """Numpy arrays become tagged tensors, since weights_only loading refuses numpy objects."""
    if isinstance(value, np.ndarray):
        return {_NUMPY_TAG: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, dict):
        return {k: _to_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_storable(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_storable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_NUMPY_TAG}:
            return value[_NUMPY_TAG].numpy()
        return {k: _from_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_from_storable(v) for v in value)
    return value


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + ".*.tmp"):
        stale.unlink(missing_ok=True)  # left by a writer killed mid-write; one writer per path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_to_storable(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint there; expected a file from a gossipdqn run"
        )
    return _from_storable(torch.load(path, map_location="cpu", weights_only=True))


def checkpoint_file(path: Path) -> Path:
    """`path` itself, or the checkpoint inside it when it is a run dir."""
    return path / CHECKPOINT_NAME if path.is_dir() else path


def evaluate_checkpoint(
    path: Path, episodes: int, *, seed: int, eps: float = 0.0, device: str | None = None
) -> tuple[Config, EvalResult]:
    """Greedy (or `eps`-greedy) evaluation of the online net saved at `path` (file or run dir),
    on fresh environments seeded from `seed`; the run's config and the result."""
    state = load_checkpoint(checkpoint_file(path))
    overrides = [f'learner.device="{device}"'] if device else []
    cfg = config_from_dict(tomllib.loads(state["config"]), overrides)
    env = make_vector_env(cfg.env, num_envs=1)
    learner = Learner(spec_of(env), cfg.network, cfg.learner, seed=cfg.seed)
    env.close()
    learner.load_state_dict(state["learner"])
    return cfg, evaluate(learner.q_values, cfg.env, episodes, seed=seed, eps=eps)
