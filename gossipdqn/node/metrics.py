"""Metrics: JSON lines per node, TensorBoard when installed, named phase timers, progress lines."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO


def _tensorboard_writer(run_dir: Path) -> EventWriter | None:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
    except ImportError:
        return None
    return EventWriter(run_dir, event_pb2, summary_pb2)


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


class EventWriter:
    """TensorBoard event files in `run_dir` (so `tensorboard --logdir RUN_DIR` shows a run per
    node): TensorBoard's own protobuf messages in TFRecord framing, written without importing
    `torch.utils.tensorboard`, whose imports would slow every node's start by a second or more."""

    def __init__(self, run_dir: Path, event_pb2: Any, summary_pb2: Any) -> None:
        self.event_pb2, self.summary_pb2, self.table = event_pb2, summary_pb2, _crc32c_table()
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.file = (run_dir / name).open("ab")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _masked_crc(self, data: bytes) -> int:
        crc, table = 0xFFFFFFFF, self.table
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        crc ^= 0xFFFFFFFF
        return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF

    def _write(self, event: Any) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self.file.write(header + struct.pack("<I", self._masked_crc(header)))
        self.file.write(data + struct.pack("<I", self._masked_crc(data)))

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """One event holding every `tag: value` at `step`."""
        summary = self.summary_pb2.Summary(
            value=[self.summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._write(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


GOSSIP_KEYS = frozenset({
    "peers_alive", "push_sum_weight", "params_mixed", "params_mixed_per_s", "mixing_stalled",
    "consensus_distance", "consensus_ratio", "insecure",
})  # fmt: skip
"""The gossip exchange's keys that do not start with `gossip_` (or `dropped_`)."""
NODE_KEYS = frozenset({
    "wall_s", "updates", "episodes", "replay_size", "return_mean", "loss", "mean_q",
    "env_steps_per_s", "updates_per_s", "epsilon",
})  # fmt: skip
"""The node's own training keys."""


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metric: grouped as train/, eval/, time/, gossip/ or exchange/."""
    if key.startswith("gossip_"):
        return "gossip/" + key.removeprefix("gossip_")
    if key in GOSSIP_KEYS or key.startswith("dropped_"):
        return "gossip/" + key
    for prefix in ("eval_", "time_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key.removeprefix(prefix)}"
    return ("train/" if key in NODE_KEYS else "exchange/") + key


class MetricsLog:
    """Appends one JSON object a line to `metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1 << 16)
        self.tb = _tensorboard_writer(run_dir) if tensorboard else None
        self.last_flush = time.monotonic()
        write_process_file(run_dir, metrics_offset=self.file.tell())

    def write(self, record: Mapping[str, Any]) -> None:
        """Log one record; it must hold `step`."""
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            scalars = {
                tensorboard_tag(key): float(value) for key, value in clean.items()
                if key != "step" and isinstance(value, int | float)
            }  # fmt: skip
            self.tb.add_scalars(scalars, clean["step"])

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


PROCESS_FILE = "process.json"
"""Who writes a node dir: host, pid, start time, and how many times a process started on it."""


def write_process_file(run_dir: Path, metrics_offset: int = 0) -> None:
    """Record this process in `run_dir/process.json`: `starts` counts up on each resume, and
    `metrics_offset` is where this process's records begin in `metrics.jsonl`."""
    path = run_dir / PROCESS_FILE
    try:
        starts = int(json.loads(path.read_text())["starts"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        starts = 1
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    info |= {"starts": starts, "metrics_offset": metrics_offset}
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(info) + "\n")
    temp.replace(path)


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
    if record.get("insecure"):
        parts.append("INSECURE: unauthenticated, unencrypted")
    return "  ".join(parts)


def print_progress(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)


class LineClock:
    """When a progress line is due (every `every_s` seconds), and the env steps/s since the last."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.last, self.steps = every_s, time.monotonic(), 0

    def speed_if_due(self, steps: int, *, last: bool = False) -> float | None:
        """Env steps per second since the last line when a line is due now, else None.

        With `last` (the run's loop has ended) a line is due unless one already showed `steps`."""
        now = time.monotonic()
        elapsed = now - self.last
        if (elapsed < self.every_s and not last) or (last and steps == self.steps):
            return None
        speed = (steps - self.steps) / max(elapsed, 1e-9)
        self.last, self.steps = now, steps
        return speed
