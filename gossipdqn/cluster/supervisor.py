"""The remote side of `gossipdqn launch`: run one node in its own process group, stop it with ssh.

`python -m gossipdqn.cluster.supervisor --pidfile F [--grace S] -- NODE ARGV` starts the node in a
new session, records its process group id in F, and stops the whole group when the ssh connection
goes away (its stdin reaches end of file) or when signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

PIDFILE = "node.pgid"
"""Name of the file, in a node's run directory, that holds its process group id."""


def supervise(pidfile: Path, argv: Sequence[str], grace: float = 10.0) -> int:
    """Remote side: run a node in its own process group; stop the group when ssh goes away."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    pidfile.with_suffix(".tmp").write_text(f"{proc.pid}\n")
    pidfile.with_suffix(".tmp").replace(pidfile)
    try:
        while proc.poll() is None and not stop.is_set() and not _at_eof(sys.stdin.fileno(), 0.2):
            pass
        if proc.poll() is None:
            proc.terminate()  # the node stops its own children; the group is killed after
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pidfile.unlink(missing_ok=True)
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _at_eof(fd: int, timeout: float) -> bool:
    """Whether `fd` (ssh's channel) reached end of file, waiting at most `timeout` seconds."""
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable) and not os.read(fd, 4096)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gossipdqn.cluster.supervisor --pidfile F [--grace S] -- NODE ARGV`."""
    parser = argparse.ArgumentParser(prog="python -m gossipdqn.cluster.supervisor")
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("expected a command after --")
    return supervise(args.pidfile, command, args.grace)


if __name__ == "__main__":
    sys.exit(main())
