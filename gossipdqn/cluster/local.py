"""`gossipdqn local -n N`: N gossip nodes as processes on this machine, over loopback TCP."""

from __future__ import annotations

import json
import socket
import sys
import threading
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from gossipdqn.cluster import procs
from gossipdqn.cluster.procs import STOP_GRACE_S
from gossipdqn.cluster.view import live_view


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports the OS reports free right now (bound to port 0, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def node_command(
    rank: int, addresses: list[str], run_dir: Path, passthrough: list[str], *, resume: bool
) -> list[str]:
    """The command line of node `rank`; it writes (or resumes) `run_dir/node-<rank>`."""
    where = "--resume" if resume else "--run-dir"
    return [
        sys.executable, "-m", "gossipdqn", "node", "--rank", str(rank),
        "--peers", ",".join(addresses), where, str(run_dir / f"node-{rank}"), *passthrough,
    ]  # fmt: skip


def combined_summary(run_dir: Path, codes: list[int]) -> dict[str, Any]:
    """Per-node summaries side by side with the figures across nodes."""
    nodes = []
    for rank, code in enumerate(codes):
        path = run_dir / f"node-{rank}" / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        nodes.append({"rank": rank, "exit_code": code, "summary": summary})
    done = [n["summary"] for n in nodes if n["summary"]]
    finals = [s["final_eval_return_mean"] for s in done if s["final_eval_return_mean"] is not None]
    reached = [s for s in done if s["steps_to_threshold"] is not None]
    return {
        "nodes": nodes,
        "failed": [n["rank"] for n in nodes if n["exit_code"] != 0],
        "final_eval_return_min": min(finals) if finals else None,
        "final_eval_return_mean": sum(finals) / len(finals) if finals else None,
        "env_steps_total": sum(s["env_steps"] for s in done),
        "first_steps_to_threshold": min((s["steps_to_threshold"] for s in reached), default=None),
        "first_seconds_to_threshold": min(
            (s["seconds_to_threshold"] for s in reached), default=None
        ),
        "nodes_reached_threshold": len(reached),
    }


def run_local(
    n: int, run_dir: Path, passthrough: list[str], stop: threading.Event, *,
    resume: bool = False, live: bool = False,
) -> int:  # fmt: skip
    """Run `n` nodes to the end (or until `stop`); write the combined summary; exit code.

    With `live` the nodes are quiet and a table of them is kept up to date on the terminal.
    """
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet = ["--quiet"] if live and "--quiet" not in passthrough else []
    commands = [
        node_command(r, addresses, run_dir, [*passthrough, *quiet], resume=resume)
        for r in range(n)
    ]  # fmt: skip
    exits: dict[int, int] = {}

    def record(rank: int, code: int) -> bool:
        exits[rank] = code
        return False  # watch the others to the end

    with live_view(run_dir, n, exits) if live else nullcontext():
        # node output goes to ours unprefixed (above the table when live): lines carry a label
        nodes = [child.proc for child in procs.start_group(commands)]
        try:
            procs.watch(nodes, stop, on_exit=record)
        finally:
            procs.stop(nodes, STOP_GRACE_S)
            exits.update({rank: p.returncode for rank, p in enumerate(nodes)})
    codes = [p.returncode for p in nodes]
    summary = combined_summary(run_dir, codes)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for rank, code in enumerate(codes):
        if code != 0:
            print(f"gossipdqn local: node {rank} exited with code {code}", file=sys.stderr)
    return 1 if summary["failed"] else 0
