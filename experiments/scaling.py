"""Scaling study: per-node env steps and CPU seconds to the threshold against the node count.

    python experiments/scaling.py --config experiments/configs/cartpole.toml \
        --nodes 1 2 4 8 --seeds 5 --modes gossip allreduce ps ideal \
        --out experiments/results/scaling/cartpole

Modes: `gossip` (`gossipdqn local`), `allreduce` and `ps` (the baselines) with N workers, and
`ideal`, one node with N times the actors (`baseline single --actors-scale N`). N = 1 is one
plain node, run once per seed and shared by every mode as the reference. A node's process CPU
seconds while training (`cpu_seconds_to_threshold`) stand for its wall-clock on a machine of its
own, so swarms of different N compare on this 2-core machine; the ideal is one machine, so its
CPU seconds are the whole run's. A swarm's figure is its median node's (a node that never
reached the threshold counts as slower than all). Runs go one after another into
OUT/runs/<mode>-n<N>-s<seed>; one that already ended well is skipped, so the study runs in
pieces, and `--report-only` tabulates the runs finished so far. `--to-end` trains every run to
its budget and adds post-solve stability: the share of a node's periodic evaluations at or above
the threshold after it first met it, and every node's final evaluation. Writes OUT/scaling.md,
OUT/scaling.png and OUT/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from compare import RUN_LIMIT_S, one_run

from gossipdqn.cluster.procs import signals_to_event
from gossipdqn.config import load_config
from gossipdqn.report import bootstrap_ci, iqm, is_run_dir, load_run, traffic

MODES = ("gossip", "allreduce", "ps", "ideal")
LAUNCHED_AS = {"one": "single", "ideal": "single", "gossip": "gossip", "ps": "ps",
               "allreduce": "allreduce"}  # fmt: skip
"""The mode of `experiments/compare.py` that runs each of ours."""
RNG_SEED = 0


def run_name(mode: str, n: int, seed: int) -> str:
    return f"one-n1-s{seed}" if n == 1 else f"{mode}-n{n}-s{seed}"


def finished(run_dir: Path) -> bool:
    """Whether the run ended with every process's summary (one that failed to start reruns)."""
    if not is_run_dir(run_dir):
        return False
    return not json.loads((run_dir / "summary.json").read_text()).get("failed")


def _median_node(values: list[float | None]) -> float | None:
    """The median node's value, a node that never reached it counted as slower than all."""
    ordered = sorted(np.inf if v is None else v for v in values)
    mid = ordered[(len(ordered) - 1) // 2]
    return None if not values or np.isinf(mid) else float(mid)


def post_solve(evals: np.ndarray, summary: dict[str, Any], threshold: float) -> list[bool]:
    """Whether each periodic evaluation after the node first met the threshold was at it."""
    solved_at = summary.get("steps_to_threshold")
    if solved_at is None:
        return []
    return [bool(r >= threshold) for step, _, r in evals if step > solved_at]


def run_figures(run_dir: Path, mode: str, n: int) -> dict[str, Any]:
    """One run's figures: per-node env steps and CPU seconds to the threshold, bytes, stability."""
    run = load_run(run_dir)
    ended = [(node["summary"], evals) for node, evals in zip(run.summary["nodes"], run.evals)
             if node["summary"]]  # fmt: skip
    nodes = [summary for summary, _ in ended]
    cpu = [s.get("cpu_seconds_to_threshold") for s in nodes]
    per_actor_set = n if mode in ("one", "ideal") else 1  # the ideal's steps are all N sets'
    steps = [None if s["steps_to_threshold"] is None else s["steps_to_threshold"] / per_actor_set
             for s in nodes]  # fmt: skip
    threshold = nodes[0]["threshold"]
    after = [ok for summary, evals in ended for ok in post_solve(evals, summary, threshold)]
    return {
        "mode": mode, "nodes": n, "run": run_dir.name,
        "steps_to_threshold": _median_node(steps),
        "cpu_seconds_to_threshold": _median_node(cpu),
        "nodes_reached": sum(v is not None for v in steps), "node_count": len(nodes),
        "sent_bytes_per_node_per_s": traffic(run)[0],
        "post_solve_evals": len(after), "post_solve_at_threshold": sum(after),
        "final_evals": [s["final_eval_return_mean"] for s in nodes],
        "stopped_by_limit": any(s.get("interrupted") for s in nodes),
    }  # fmt: skip


def _ratio_ci(reference: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval of IQM(reference) / IQM(values), both resampled."""
    rng = np.random.default_rng(RNG_SEED)
    ref = reference[rng.integers(0, len(reference), (2000, len(reference)))]
    val = values[rng.integers(0, len(values), (2000, len(values)))]
    ratios = iqm(ref, axis=1) / iqm(val, axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _iqm_ci(values: np.ndarray) -> list[float] | None:
    if not len(values):
        return None
    low, high = bootstrap_ci(values, seed=RNG_SEED)
    return [float(iqm(values)), float(low[0]), float(high[0])]


def aggregate(runs: list[dict[str, Any]], key: str, reference: np.ndarray) -> dict[str, Any]:
    """IQM [95% CI] of `key` over the runs that reached the threshold, and the speedup."""
    values = np.array([r[key] for r in runs if r[key] is not None], dtype=float)
    out: dict[str, Any] = {"iqm_ci": _iqm_ci(values), "speedup": None, "speedup_ci": None}
    if len(values) and len(reference):
        out["speedup"] = float(iqm(reference) / iqm(values))
        out["speedup_ci"] = list(_ratio_ci(reference, values))
    return out


def group_figures(figures: list[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """One row per (mode, N): IQMs, speedups over N = 1, efficiency, traffic, stability."""
    one = [f for f in figures if f["mode"] == "one"]
    rows = []
    for mode in ["one", *modes]:
        for n in sorted({f["nodes"] for f in figures if f["mode"] == mode}):
            runs = [f for f in figures if f["mode"] == mode and f["nodes"] == n]
            row: dict[str, Any] = {"mode": mode, "nodes": n, "runs": len(runs)}
            row["reached"] = sum(r["cpu_seconds_to_threshold"] is not None for r in runs)
            for key in ("cpu_seconds_to_threshold", "steps_to_threshold"):
                ref = np.array([f[key] for f in one if f[key] is not None], dtype=float)
                row[key] = aggregate(runs, key, ref)
            speedup = row["cpu_seconds_to_threshold"]["speedup"]
            row["efficiency"] = speedup / n if speedup is not None else None
            row["sent_bytes_per_node_per_s"] = float(
                np.median([r["sent_bytes_per_node_per_s"] for r in runs])
            )
            evals = sum(r["post_solve_evals"] for r in runs)
            row["post_solve_share"] = (
                sum(r["post_solve_at_threshold"] for r in runs) / evals if evals else None
            )
            finals = [v for r in runs for v in r["final_evals"] if v is not None]
            row["final_eval_min"] = min(finals) if finals else None
            row["stopped_by_limit"] = [r["run"] for r in runs if r["stopped_by_limit"]]
            rows.append(row)
    return rows


def _cell(fig: dict[str, Any], fmt: str) -> str:
    if fig["iqm_ci"] is None:
        return "-"
    mid, low, high = fig["iqm_ci"]
    return f"{fmt.format(mid)} [{fmt.format(low)}, {fmt.format(high)}]"


def _speedup(fig: dict[str, Any]) -> str:
    if fig["speedup"] is None:
        return "-"
    low, high = fig["speedup_ci"]
    return f"{fig['speedup']:.2f}x [{low:.2f}, {high:.2f}]"


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: IQM over seeds with 95% bootstrap intervals; speedups over one node."""
    lines = [
        "| mode | N | reached | env steps/node to threshold | CPU s/node to threshold "
        "| speedup (CPU s) | efficiency | speedup (env steps) | sent B/node/s "
        "| post-solve evals at threshold | lowest final eval |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cpu, steps = r["cpu_seconds_to_threshold"], r["steps_to_threshold"]
        lines.append("| " + " | ".join([
            r["mode"], str(r["nodes"]), f"{r['reached']}/{r['runs']}", _cell(steps, "{:,.0f}"),
            _cell(cpu, "{:.1f}"), _speedup(cpu), _maybe(r["efficiency"], "{:.2f}"),
            _speedup(steps), f"{r['sent_bytes_per_node_per_s']:,.0f}",
            _maybe(r["post_solve_share"], "{:.0%}"), _maybe(r["final_eval_min"], "{:.0f}"),
        ]) + " |")  # fmt: skip
    cut = [name for r in rows for name in r["stopped_by_limit"]]
    if cut:  # their final evaluation and the end of their budget are missing
        lines += ["", f"Stopped by --limit-s before the end of their budget: {', '.join(cut)}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speedup in per-node CPU seconds against N per mode, with the linear line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = max(r["nodes"] for r in rows)
    ax.plot([1, top], [1, top], "k--", lw=1, label="linear")
    for mode in dict.fromkeys(r["mode"] for r in rows if r["mode"] != "one"):
        pts = [r for r in rows if r["mode"] in (mode, "one")]
        pts = [r for r in pts if r["cpu_seconds_to_threshold"]["speedup"] is not None]
        x = [r["nodes"] for r in pts]
        y = [r["cpu_seconds_to_threshold"]["speedup"] for r in pts]
        err = np.array([[v - r["cpu_seconds_to_threshold"]["speedup_ci"][0],
                         r["cpu_seconds_to_threshold"]["speedup_ci"][1] - v]
                        for v, r in zip(y, pts)]).T.reshape(2, -1)  # fmt: skip
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes N")
    ax.set_ylabel("speedup in per-node CPU seconds to threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(mode, nodes, seed) of every run: N = 1 once per seed, then each mode at each N > 1."""
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [("one", 1, s) for s in seeds] if 1 in args.nodes else []
    runs += [(m, n, s) for n in args.nodes if n > 1 for m in args.modes for s in seeds]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML config (default: CartPole)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds FIRST..FIRST+SEEDS-1 (two studies on disjoint seeds in one OUT "
        "run side by side; then --report-only --seeds ALL tabulates them)",
    )
    parser.add_argument(
        "--limit-s",
        type=float,
        default=RUN_LIMIT_S,
        help="wall-clock seconds after which a run is stopped",
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/scaling/cartpole"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--to-end", action="store_true", help="no early stop: stability too")
    parser.add_argument("--pull-every", type=int, default=1, help="ps: updates between pulls")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs only")
    args = parser.parse_args(argv)
    sets = [f"train.stop_at_threshold={'false' if args.to_end else 'true'}", *args.overrides]
    args.total_steps = load_config(args.config, sets).train.total_steps
    common = [a for s in sets for a in ("--set", s)] + ["--quiet"]
    common += ["--config", str(args.config)] if args.config else []
    args.interrupted = threading.Event()
    figures = []
    with signals_to_event(args.interrupted):  # SIGINT, SIGTERM: the study ends; rerun goes on
        started = time.monotonic()
        for mode, n, seed in plan(args):
            run_dir = args.out / "runs" / run_name(mode, n, seed)
            if args.report_only and not finished(run_dir):
                continue
            if not finished(run_dir):
                try:
                    one_run(LAUNCHED_AS[mode], n, run_dir, [*common, "--seed", str(seed)], args,
                            kill=False, limit_s=args.limit_s)  # fmt: skip
                except KeyboardInterrupt:
                    print(f"[scaling] stopped in {run_dir.name}; rerun to go on", file=sys.stderr)
                    return 130
                print(f"[scaling] {run_dir.name} at {time.monotonic() - started:.0f} s", flush=True)
            figures.append(run_figures(run_dir, mode, n))
            if figures[-1]["stopped_by_limit"]:
                print(f"[scaling] {run_dir.name} was stopped by --limit-s {args.limit_s:.0f} before"
                      " the end of its budget; delete it and rerun with a larger one to redo it",
                      file=sys.stderr)  # fmt: skip
    if not figures:
        print(f"[scaling] no finished runs in {args.out / 'runs'}", file=sys.stderr)
        return 1
    rows = group_figures(figures, args.modes)
    table = markdown(rows)
    (args.out / "scaling.md").write_text(table)
    (args.out / "scaling.json").write_text(
        json.dumps({"command": sys.argv, "runs": figures, "rows": rows}, indent=1) + "\n"
    )
    plot(rows, args.out / "scaling.png")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
