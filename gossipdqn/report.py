"""`gossipdqn report`: plots and a markdown table comparing finished runs, grouped by mode.

Across seeds we report the interquartile mean (IQM) with a 95% percentile bootstrap confidence
interval, as rliable recommends for few runs; with one task the stratified bootstrap is a plain
bootstrap over runs. A run dir is any dir with a combined `summary.json` (gossip `local`, or a
baseline); a dir without one is searched one level down, so a folder of runs can be passed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP_REPS = 2000
GRID_POINTS = 60


class ReportError(ValueError):
    """Nothing to report on, or no way to draw; the message says what is expected."""


@dataclass(frozen=True)
class Run:
    """One finished run: its mode, worker count, combined summary and per-node eval curves."""

    path: Path
    mode: str
    nodes: int
    summary: dict[str, Any]
    evals: tuple[np.ndarray, ...]
    """Per node, rows of (env steps of the node, seconds of training, eval return)."""

    @property
    def killed(self) -> dict[str, Any] | None:
        return self.summary.get("killed")

    @property
    def workers(self) -> int:
        """Processes that ran actors (1 for a single node, however many actors it had)."""
        return len(self.summary["nodes"])


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a combined summary (a node's own summary.json does not count)."""
    summary = path / "summary.json"
    return summary.is_file() and "nodes" in json.loads(summary.read_text())


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Each path that is a run dir, or its children that are."""
    found = []
    for path in paths:
        if is_run_dir(path):
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
    found = list(dict.fromkeys(p.resolve() for p in found))
    if not found:
        raise ReportError(
            f"no run dirs among {[str(p) for p in paths]}; expected a combined summary.json"
        )
    return found


def _node_evals(node_dir: Path) -> np.ndarray:
    rows = []
    metrics = node_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for line in lines:
        record = json.loads(line)
        if record.get("eval_return_mean") is not None:
            rows.append((record["step"], record["wall_s"], record["eval_return_mean"]))
    return np.array(rows, dtype=float).reshape(-1, 3)


def load_run(path: Path) -> Run:
    """Read a run dir; a summary without a mode is a gossip run (`gossipdqn local`)."""
    summary = json.loads((path / "summary.json").read_text())
    mode = summary.get("mode", "gossip")
    nodes = summary.get("actors_scale") or len(summary["nodes"])
    evals = tuple(_node_evals(path / f"node-{n['rank']}") for n in summary["nodes"])
    return Run(path, mode, int(nodes), summary, evals)


def iqm(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle half along `axis` (25% cut from each end)."""
    ordered = np.sort(scores, axis=axis)
    n = ordered.shape[axis]
    cut = int(math.floor(0.25 * n))
    return np.take(ordered, range(cut, n - cut), axis=axis).mean(axis=axis)


def bootstrap_ci(
    scores: np.ndarray, *, reps: int = BOOTSTRAP_REPS, alpha: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the IQM over runs (axis 0) for each column of `scores`."""
    scores = np.asarray(scores, dtype=float).reshape(len(scores), -1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scores), size=(reps, len(scores)))
    stats = iqm(scores[picks], axis=1)
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return low, high


def run_curve(run: Run, grid: np.ndarray, axis: str) -> np.ndarray:
    """The run's eval return at each grid point (mean over nodes of their latest eval)."""
    values = []
    for evals in (e for e in run.evals if len(e)):
        x = evals[:, 0] * run.workers if axis == "steps" else evals[:, 1]
        at = np.searchsorted(x, grid, side="right") - 1
        values.append(np.where(at >= 0, evals[np.maximum(at, 0), 2], np.nan))
    return np.nanmean(np.array(values), axis=0) if values else np.full(len(grid), np.nan)


def group_curve(
    runs: list[Run], axis: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid, IQM and CI bounds over the group's runs, where every run has an eval."""
    col = 0 if axis == "steps" else 1
    ends = [max(e[-1, col] * (r.workers if axis == "steps" else 1) for e in r.evals if len(e))
            for r in runs if any(len(e) for e in r.evals)]  # fmt: skip
    grid = np.linspace(0.0, min(ends), GRID_POINTS) if ends else np.zeros(0)
    with warnings.catch_warnings():  # nanmean of a column before any eval: NaN, dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        curves = np.array([run_curve(r, grid, axis) for r in runs]).reshape(len(runs), -1)
    keep = ~np.isnan(curves).any(axis=0)
    grid, curves = grid[keep], curves[:, keep]
    if not len(grid):
        return grid, grid, grid, grid
    low, high = bootstrap_ci(curves)
    return grid, iqm(curves), low, high


def plot(groups: dict[tuple[str, int], list[Run]], path: Path) -> None:
    """Return vs total env steps and vs wall-clock seconds, one IQM line with CI per group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'gossipdqn[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (mode, nodes), runs in sorted(groups.items()):
        for ax, axis in zip(axes, ("steps", "wall")):
            grid, mid, low, high = group_curve(runs, axis)
            line = ax.plot(grid, mid, label=f"{mode} n={nodes} ({len(runs)} runs)")[0]
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("env steps (all workers)")
    axes[1].set_xlabel("seconds of training")
    for ax in axes:
        ax.set_ylabel("eval return (IQM, 95% bootstrap CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _iqm_text(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    arr = np.array(values, dtype=float)
    low, high = bootstrap_ci(arr)
    return f"{fmt.format(float(iqm(arr)))} [{fmt.format(low[0])}, {fmt.format(high[0])}]"


def _bytes_per_s(exchange: dict[str, Any]) -> tuple[float, float]:
    """(sent, sent + received) bytes per second of one node's exchange, gossip or baseline."""
    sent = exchange.get("gossip_sent_bytes_per_s", exchange.get("sent_bytes_per_s", 0.0))
    recv = exchange.get("gossip_recv_bytes_per_s", exchange.get("recv_bytes_per_s", 0.0))
    return sent, sent + recv


def traffic(run: Run) -> tuple[float, float]:
    """Bytes sent per node per second, and the most bytes per second through one process."""
    per_node = [_bytes_per_s(n["summary"].get("exchange", {}))
                for n in run.summary["nodes"] if n["summary"]]  # fmt: skip
    busiest = max((total for _, total in per_node), default=0.0)
    server = run.summary.get("server")
    if server:
        busiest = max(busiest, server["bytes_in_per_s"] + server["bytes_out_per_s"])
    sent = float(np.mean([s for s, _ in per_node])) if per_node else 0.0
    return sent, busiest


def robustness(run: Run) -> str:
    """What happened when a process was killed halfway: who finished, with what return."""
    killed = run.killed or {}
    nodes = run.summary["nodes"]
    survivors = [n for n in nodes if n["exit_code"] != -9]
    finished = [n for n in survivors if n["exit_code"] == 0]
    codes = sorted({n["exit_code"] for n in survivors})
    final = run.summary.get("final_eval_return_mean")
    text = f"{killed.get('victim', '?')} killed at step {killed.get('at_step', '?')}: "
    text += f"{len(finished)}/{len(survivors)} workers finished (exit {codes})"
    return text + (f", final {final:.0f}" if final is not None else ", no final eval")


TABLE_HEADER = (
    "| mode | nodes | runs | env steps to threshold | seconds to threshold | final return "
    "| sent B/node/s | busiest process B/s | one process killed halfway |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def table_row(mode: str, nodes: int, runs: list[Run], faults: list[Run]) -> str:
    """One markdown row: IQM [95% CI] over seeds; thresholds over the runs that reached it."""
    reached = [r.summary for r in runs if r.summary.get("first_steps_to_threshold") is not None]
    steps = [s["first_steps_to_threshold"] * len(s["nodes"]) for s in reached]
    seconds = [s["first_seconds_to_threshold"] for s in reached]
    finals = [r.summary["final_eval_return_mean"] for r in runs
              if r.summary.get("final_eval_return_mean") is not None]  # fmt: skip
    sent, busiest = (float(np.mean(v)) for v in zip(*(traffic(r) for r in runs)))
    share = f" ({len(reached)}/{len(runs)})"
    cells = [
        mode, str(nodes), str(len(runs)), _iqm_text(steps) + share, _iqm_text(seconds, "{:.1f}"),
        _iqm_text(finals), f"{sent:,.0f}", f"{busiest:,.0f}",
        "; ".join(robustness(f) for f in faults) or "-",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |\n"


def table(runs: list[Run]) -> str:
    """The markdown table, one row per (mode, nodes); killed runs go to the last column."""
    groups, faults = _groups(runs)
    rows = [table_row(m, n, g, faults.get((m, n), [])) for (m, n), g in sorted(groups.items())]
    return TABLE_HEADER + "".join(rows)


def _groups(
    runs: list[Run],
) -> tuple[dict[tuple[str, int], list[Run]], dict[tuple[str, int], list[Run]]]:
    groups: dict[tuple[str, int], list[Run]] = defaultdict(list)
    faults: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        (faults if run.killed else groups)[(run.mode, run.nodes)].append(run)
    return dict(groups), dict(faults)


def write_report(paths: list[Path], out: Path) -> list[Path]:
    """Write `out/returns.png` and `out/table.md` for the runs under `paths`; their paths."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    groups, _ = _groups(runs)
    if not groups:
        raise ReportError("only runs with a killed process; expected some complete runs")
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "returns.png", out / "table.md"
    plot(groups, png)
    note = (
        "IQM over seeds with a 95% bootstrap CI in brackets; thresholds over the runs that "
        "reached one (count in parentheses); env steps are summed over workers.\n\n"
    )
    md.write_text(note + table(runs))
    return [png, md]
