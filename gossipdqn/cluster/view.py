"""The swarm at a glance: one row per node, read from the run dir, live on a terminal.

Each node writes `RUN_DIR/node-R/` (`process.json`, `metrics.jsonl`, `summary.json`), so the same
rows come out for `gossipdqn local`, a launch on a shared filesystem, and `gossipdqn status`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

PROCESS_FILE = "process.json"
"""Host, pid, start time and start count of the process writing a node dir (node/metrics.py)."""
SILENT_S = 60.0
"""A node of another host whose metrics have not changed for this long counts as dead."""
REFRESH_S = 1.0
"""How often the live view re-reads the node dirs."""


@dataclass
class NodeTail:
    """What a node dir says so far; `read` parses only what was appended since the last call."""

    path: Path
    offset: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    """The latest training record (the one with `updates`)."""
    last_eval: float | None = None
    train_offset: int = -1
    """Where the latest training record starts in `metrics.jsonl` (-1: none yet)."""

    def read(self) -> None:
        metrics = self.path / "metrics.jsonl"
        try:
            with metrics.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for its end
        for line in whole.splitlines(keepends=True):
            start, self.offset = self.offset, self.offset + len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("eval_return_mean") is not None:
                self.last_eval = record["eval_return_mean"]
            if "updates" in record:
                self.train, self.train_offset = record, start


@dataclass(frozen=True)
class NodeRow:
    """One node's line of the table."""

    rank: int
    host: str
    state: str
    record: Mapping[str, Any]
    last_eval: float | None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def node_state(
    tail: NodeTail, process: Mapping[str, Any] | None, summary: Mapping[str, Any] | None,
    exit_code: int | None, now: float,
) -> str:  # fmt: skip
    """training, solved, done, stopped, dead, restarting or starting, from what the dir says.

    `summary` is the one the current process wrote (None before it ends); `exit_code` is the
    launcher's view of the process (None: running, or not known here).
    """
    if exit_code not in (None, 0):
        return "dead"
    if summary is not None:
        if summary.get("steps_to_threshold") is not None:
            return "solved"
        return "stopped" if summary.get("interrupted") else "done"
    if exit_code == 0:
        return "done"
    if process is not None and not _running(tail, process, now):
        return "dead"
    if process is None or tail.train_offset < process.get("metrics_offset", 0):
        return "restarting" if (process or {}).get("starts", 1) > 1 else "starting"
    return "training"


def _running(tail: NodeTail, process: Mapping[str, Any], now: float) -> bool:
    """The pid when the node is on this host; else whether its metrics changed recently."""
    if process.get("host") == socket.gethostname():
        return _pid_alive(int(process.get("pid", 0)))
    try:
        return now - (tail.path / "metrics.jsonl").stat().st_mtime < SILENT_S
    except OSError:
        return now - process.get("started", 0.0) < SILENT_S


def read_row(tail: NodeTail, rank: int, exit_code: int | None = None) -> NodeRow:
    """Bring `tail` up to date and make its row."""
    tail.read()
    process = _json(tail.path / PROCESS_FILE)
    summary = _json(tail.path / "summary.json")
    with contextlib.suppress(OSError):  # one from before a restart is not this process's end
        if (tail.path / "summary.json").stat().st_mtime < (process or {}).get("started", 0.0):
            summary = None
    state = node_state(tail, process, summary, exit_code, time.time())
    host = (process or {}).get("host", "?")
    return NodeRow(rank, host, state, tail.train, tail.last_eval)


def node_dirs(run_dir: Path) -> dict[int, Path]:
    """rank -> `RUN_DIR/node-<rank>` for every node dir there."""
    out = {}
    for path in run_dir.glob("node-*"):
        suffix = path.name.removeprefix("node-")
        if path.is_dir() and suffix.isdigit():
            out[int(suffix)] = path
    return dict(sorted(out.items()))


def _num(value: Any, fmt: str) -> str:
    if value is None or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return fmt.format(value)


def _bytes_per_s(record: Mapping[str, Any]) -> float | None:
    sent, recv = record.get("gossip_sent_bytes_per_s"), record.get("gossip_recv_bytes_per_s")
    return None if sent is None and recv is None else (sent or 0.0) + (recv or 0.0)


def _si(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}T"


COLUMNS = (
    "rank", "host", "env steps", "steps/s", "return", "last eval", "loss", "eps",
    "peers", "mixed/s", "bytes/s", "state",
)  # fmt: skip


def _cells(row: NodeRow) -> list[str]:
    r = row.record
    return [
        str(row.rank), row.host, _num(r.get("step"), "{:,}"),
        _num(r.get("env_steps_per_s"), "{:,.0f}"), _num(r.get("return_mean"), "{:.1f}"),
        _num(row.last_eval, "{:.1f}"), _num(r.get("loss"), "{:.4f}"),
        _num(r.get("epsilon"), "{:.3f}"), _num(r.get("peers_alive"), "{}"),
        _num(r.get("params_mixed_per_s"), "{:.1f}"), _si(_bytes_per_s(r)), row.state,
    ]  # fmt: skip


def _total(rows: Sequence[NodeRow], value: Any) -> float:
    return sum(v for v in (value(row) for row in rows) if v is not None and math.isfinite(v))


def footer(rows: Sequence[NodeRow]) -> str:
    """The swarm's totals and its mean consensus distance."""
    states: dict[str, int] = {}
    for row in rows:
        states[row.state] = states.get(row.state, 0) + 1
    steps = _total(rows, lambda row: row.record.get("step"))
    speed = _total(rows, lambda row: row.record.get("env_steps_per_s"))
    mixed = _total(rows, lambda row: row.record.get("params_mixed_per_s"))
    traffic = _total(rows, lambda row: _bytes_per_s(row.record))
    distances = [
        d for row in rows if (d := row.record.get("consensus_distance")) is not None
    ]  # fmt: skip
    consensus = f"{sum(distances) / len(distances):.4g}" if distances else "-"
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    return (
        f"swarm: {len(rows)} nodes ({counts})  env steps {steps:,.0f}  steps/s {speed:,.0f}  "
        f"mixed/s {mixed:.1f}  bytes/s {_si(traffic)}  consensus distance {consensus}"
    )


def render(rows: Sequence[NodeRow], title: str = "") -> Group:
    """The table of `rows` with the swarm footer under it."""
    table = Table(title=title or None, title_justify="left", expand=False, pad_edge=False)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("host", "state") else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return Group(table, Text(footer(rows)))


class SwarmView:
    """The rows of a run's nodes, kept up to date from its dir (incremental reads)."""

    def __init__(self, run_dir: Path, n: int | None = None) -> None:
        self.run_dir, self.n = run_dir, n
        self.tails: dict[int, NodeTail] = {}

    def rows(self, exit_codes: Mapping[int, int] | None = None) -> list[NodeRow]:
        ranks = range(self.n) if self.n is not None else node_dirs(self.run_dir)
        rows = []
        for rank in ranks:
            tail = self.tails.setdefault(rank, NodeTail(self.run_dir / f"node-{rank}"))
            rows.append(read_row(tail, rank, (exit_codes or {}).get(rank)))
        return rows


@contextmanager
def live_view(
    run_dir: Path, n: int | None = None, exit_codes: Mapping[int, int] | None = None
) -> Iterator[None]:
    """Show the run's table in place on the terminal while inside, redrawn every REFRESH_S.

    `n` nodes (None: every node dir found); `exit_codes` is the launcher's record of the nodes
    that exited, read at each redraw. What is printed meanwhile appears above the table.
    """
    view, title = SwarmView(run_dir, n), f"gossipdqn: {run_dir}"

    def current() -> Group:
        return render(view.rows(exit_codes), title)

    with Live(get_renderable=current, refresh_per_second=1 / REFRESH_S, redirect_stderr=True):
        yield


def wants_live_view(plain: bool, quiet: bool) -> bool:
    """A live table only on a terminal, unless `--plain` or `--quiet` asks for today's lines."""
    return not plain and not quiet and sys.stdout.isatty()


def print_status(run_dir: Path, console: Console | None = None) -> int:
    """`gossipdqn status RUN_DIR`: the table once; the number of node dirs found."""
    rows = SwarmView(run_dir).rows()
    (console or Console()).print(render(rows, f"gossipdqn: {run_dir}"))
    return len(rows)
