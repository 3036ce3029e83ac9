"""Metrics: JSON lines per node, TensorBoard when installed, named phase timers, progress lines."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


class MetricsLog:
    """Appends one JSON object a line to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1 << 16)
        self.tb = _tensorboard_writer(run_dir) if tensorboard else None
        self.last_flush = time.monotonic()

    def write(self, record: Mapping[str, Any]) -> None:
        """Log one record; it must hold `step`."""
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self.tb.add_scalar(key, value, clean["step"])

    def flush(self) -> None:
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


class PhaseTimer:
    """Wall time spent in each named phase of a loop (act, env, replay, update, gossip...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def split(self) -> dict[str, float]:
        """Fraction of the timed total spent in each phase, as `time_<phase>` keys."""
        total = sum(self.seconds.values()) or 1.0
        return {f"time_{k}": v / total for k, v in self.seconds.items()}


def format_progress(prefix: str, record: Mapping[str, Any]) -> str:
    """One short human line: steps, speed, recent return, loss, and peers when gossiping."""
    parts = [prefix, f"step {record['step']:>8,}"]
    fields = (
        ("env_steps_per_s", "{:,.0f} st/s"),
        ("return_mean", "return {:.1f}"),
        ("eval_return_mean", "eval {:.1f}"),
        ("loss", "loss {:.4f}"),
        ("epsilon", "eps {:.3f}"),
        ("peers_alive", "peers {}"),
        ("params_mixed_per_s", "mixed {:.1f}/s"),
    )
    for key, fmt in fields:
        value = record.get(key)
        if value is not None:
            parts.append(fmt.format(value))
    if record.get("mixing_stalled"):
        parts.append("mixing stalled")
    return "  ".join(parts)


def print_progress(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)


class LineClock:
    """When a progress line is due (every `every_s` seconds), and the env steps/s since the last."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.last, self.steps = every_s, time.monotonic(), 0

    def speed_if_due(self, steps: int) -> float | None:
        """Env steps per second since the last line when a line is due now, else None."""
        now = time.monotonic()
        elapsed = now - self.last
        if elapsed < self.every_s:
            return None
        speed = (steps - self.steps) / elapsed
        self.last, self.steps = now, steps
        return speed
