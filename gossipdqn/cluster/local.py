"""`gossipdqn local -n N`: N gossip nodes as processes on this machine, over loopback TCP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

STOP_GRACE_S = 15.0
"""How long nodes get to checkpoint and exit after a stop signal before they are killed."""


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


def _pump(stream: Any, out: Any) -> None:
    for line in stream:
        out.write(line)
        out.flush()


def start_nodes(commands: list[list[str]]) -> list[subprocess.Popen]:
    """Start every node; their output goes to ours, line by line."""
    procs = []
    for cmd in commands:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout), daemon=True).start()
        procs.append(proc)
    return procs


def stop_nodes(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to every live node (they checkpoint and exit), SIGKILL to any still there after."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_nodes(procs: list[subprocess.Popen], stop: threading.Event) -> None:
    """Until every node has exited or `stop` is set."""
    while not stop.is_set() and any(p.poll() is None for p in procs):
        stop.wait(0.2)


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
    n: int, run_dir: Path, passthrough: list[str], stop: threading.Event, *, resume: bool = False
) -> int:
    """Run `n` nodes to the end (or until `stop`); write the combined summary; exit code."""
    addresses = [f"127.0.0.1:{p}" for p in free_ports(n)]
    run_dir.mkdir(parents=True, exist_ok=True)
    commands = [node_command(r, addresses, run_dir, passthrough, resume=resume) for r in range(n)]
    procs = start_nodes(commands)
    try:
        wait_nodes(procs, stop)
    finally:
        stop_nodes(procs)
    codes = [p.returncode for p in procs]
    summary = combined_summary(run_dir, codes)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for rank, code in enumerate(codes):
        if code != 0:
            print(f"gossipdqn local: node {rank} exited with code {code}", file=sys.stderr)
    return 1 if summary["failed"] else 0
