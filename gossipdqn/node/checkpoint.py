"""Checkpoints: plain state dicts written atomically and loaded with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
