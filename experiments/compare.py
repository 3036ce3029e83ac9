"""Gossip against its centralized baselines on the same DQN core; then the report.

    python experiments/compare.py --config experiments/configs/cartpole.toml --nodes 1 2 \
        --seeds 5 --modes single gossip ps allreduce --out experiments/results/compare

Runs one after another (this machine has few cores), each into OUT/runs/<mode>-n<N>-s<seed>;
a run dir that already holds a summary is skipped, so an interrupted comparison continues.
For every mode with N > 1 one more run (seed 0) kills a process halfway through node 0's
budget: the last worker for gossip and all-reduce, the server for the parameter server.
Every run uses the same budget per worker (`single` gets N times the actors and budget) and
trains to the end of it, so final returns compare at equal env steps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

from gossipdqn.baselines import run
from gossipdqn.cluster.local import free_ports, node_command
from gossipdqn.cluster.procs import signals_to_event
from gossipdqn.config import load_config
from gossipdqn.report import is_run_dir, write_report

MODES = ("single", "gossip", "ps", "allreduce")
DEFAULT_SETS = ("train.total_steps=30000", "train.stop_at_threshold=false")
RUN_LIMIT_S = 1200.0
"""A run still going after this long is stopped (SIGINT, then SIGKILL)."""


def commands(mode: str, n: int, run_dir: Path, passthrough: list[str], pull_every: int) -> list:
    """The processes of one run, and which of them are workers."""
    if mode == "single":
        cmd = [sys.executable, "-m", "gossipdqn", "baseline", "single", "--actors-scale", str(n)]
        return [[*cmd, "--run-dir", str(run_dir), *passthrough]], slice(None)
    if mode == "gossip":
        addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
        return [
            node_command(r, addresses, run_dir, passthrough, resume=False) for r in range(n)
        ], slice(None)
    if mode == "ps":
        return run.ps_commands(n, run_dir, passthrough, pull_every), slice(1, None)
    return run.allreduce_commands(n, run_dir, passthrough), slice(None)


def one_run(
    mode: str,
    n: int,
    run_dir: Path,
    passthrough: list[str],
    args: argparse.Namespace,
    kill: bool,
    limit_s: float = RUN_LIMIT_S,
) -> None:
    """Run one configuration afresh to the end (or `limit_s`); write its combined summary."""
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt left
    procs, workers = commands(mode, n, run_dir, passthrough, args.pull_every)
    stop = threading.Event()
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    fault = None
    if kill:
        victim = 0 if mode == "ps" else n - 1
        fault = run.Kill(victim, run_dir / "node-0" / "metrics.jsonl", args.total_steps // 2)
    try:  # SIGINT or SIGTERM stops this run cleanly and ends the comparison
        with signals_to_event(args.interrupted, stop):
            codes, killed = run.run_group(procs, stop, workers=workers, kill=fault)
    finally:
        timer.cancel()
    if args.interrupted.is_set():
        raise KeyboardInterrupt
    if mode == "single":
        return  # `baseline single` wrote its own summary
    extra = {}
    if killed is not None:
        label = "server" if mode == "ps" else f"node-{killed['victim']}"
        extra["killed"] = {"victim": label, "at_step": killed["at_step"]}
    run.write_summary(run_dir, mode, codes[workers], extra)


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, bool]]:
    """(mode, nodes, seed, kill) of every run, plain runs first."""
    runs = [(m, n, s, False) for n in args.nodes for m in args.modes for s in range(args.seeds)]
    if not args.no_robustness:
        runs += [(m, n, 0, True) for n in args.nodes if n > 1 for m in args.modes if m != "single"]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML config (default: CartPole)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/compare"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--pull-every", type=int, default=1, help="ps: updates between pulls")
    parser.add_argument("--no-robustness", action="store_true", help="skip the killed runs")
    args = parser.parse_args(argv)
    sets = [*DEFAULT_SETS, *args.overrides]
    args.total_steps = load_config(args.config, sets).train.total_steps
    common = [a for s in sets for a in ("--set", s)] + ["--quiet"]
    common += ["--config", str(args.config)] if args.config else []
    args.interrupted = threading.Event()
    with signals_to_event(args.interrupted):  # SIGINT, SIGTERM: the comparison ends
        started = time.monotonic()
        for mode, n, seed, kill in plan(args):
            name = f"{mode}-n{n}-s{seed}" + ("-kill" if kill else "")
            run_dir = args.out / "runs" / name
            if is_run_dir(run_dir):
                continue
            try:
                one_run(mode, n, run_dir, [*common, "--seed", str(seed)], args, kill)
            except KeyboardInterrupt:
                print(f"[compare] interrupted during {name}; rerun to continue", file=sys.stderr)
                return 130
            print(f"[compare] {name} done at {time.monotonic() - started:.0f} s", flush=True)
        for path in write_report([args.out / "runs"], args.out):
            print(f"[compare] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
