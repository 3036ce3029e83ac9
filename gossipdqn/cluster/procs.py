"""Child processes of a launcher: start a group, copy its output to ours, watch it, stop it.

Every launcher (`gossipdqn local`, `launch` over ssh, the baselines, experiments) does the same
four things with the processes it starts, and does them here:

- `start_group` starts argv lists, each output line copied to our stdout with an optional prefix;
- `watch` polls them until they have all exited, a stop event is set, or a hook says enough;
- `stop` asks them to stop (SIGINT by default), waits one grace period, then SIGKILLs the rest;
  `ask_to_stop` and `kill` are its two halves, for a caller with its own last resort;
- `signals_to_event` turns SIGINT and SIGTERM into a `threading.Event` while inside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

STOP_GRACE_S = 15.0
"""How long processes get to checkpoint and exit, once asked to stop, before they are killed."""

Proc = subprocess.Popen[Any]
"""A started process (text or bytes mode: only its pid, stdin and exit code are used here)."""

_OUTPUT_LOCK = threading.Lock()
"""Held while one line is written, so lines of different children never interleave."""


@dataclass(frozen=True)
class Child:
    """A started process and the thread copying its output to ours."""

    proc: subprocess.Popen[bytes]
    reader: threading.Thread


def start(
    argv: Sequence[str], prefix: str = "", *, pipe_stdin: bool = False, new_session: bool = False
) -> Child:
    """Start `argv`; its stdout and stderr go to our stdout line by line, `prefix` in front.

    With `pipe_stdin` the child reads a pipe (`close_stdin` then asks it to stop), else our stdin;
    with `new_session` it leads its own session and process group (`kill(..., session=True)`).
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if pipe_stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    reader = threading.Thread(
        target=_copy_lines, args=(proc.stdout, prefix, sys.stdout), daemon=True,
        name=f"output of pid {proc.pid}",
    )  # fmt: skip
    reader.start()
    return Child(proc, reader)


def start_group(
    commands: Sequence[Sequence[str]],
    prefixes: Sequence[str] | None = None,
    *,
    pipe_stdin: bool = False,
    new_session: bool = False,
) -> list[Child]:
    """Start every command in order (see `start`); if one cannot start, kill those that did."""
    prefixes = [""] * len(commands) if prefixes is None else prefixes
    if len(prefixes) != len(commands):
        raise ValueError(f"{len(prefixes)} prefixes for {len(commands)} commands; expected one")
    children: list[Child] = []
    try:
        for argv, prefix in zip(commands, prefixes):
            children.append(start(argv, prefix, pipe_stdin=pipe_stdin, new_session=new_session))
    except BaseException:
        kill([child.proc for child in children], session=new_session)
        raise
    return children


def _copy_lines(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    """Copy a child's output to `out` line by line, `prefix` in front, until it closes."""
    with stream:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            with _OUTPUT_LOCK:
                out.write(f"{prefix}{line}\n")
                out.flush()


def join_output(children: Sequence[Child], timeout_s: float = 5.0) -> None:
    """Wait (at most `timeout_s` each) until every child's output has been copied."""
    for child in children:
        child.reader.join(timeout_s)


def watch(
    procs: Sequence[Proc],
    stop: threading.Event,
    *,
    on_exit: Callable[[int, int], bool] | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 0.2,
) -> dict[int, int]:
    """Poll until every process in `procs` exited, `stop` is set or `on_exit` returns True.

    `on_exit(index, code)` is called once per exit as it is seen (index into `procs`); return
    True to stop watching (`lambda i, code: True` waits for the first exit). `on_poll()` is
    called after every poll that leaves a process running. Returns {index: exit code} of the
    exits seen, in the order seen.
    """
    pending = dict(enumerate(procs))
    exits: dict[int, int] = {}
    while pending and not stop.is_set():
        for index, proc in list(pending.items()):
            code = proc.poll()
            if code is None:
                continue
            del pending[index]
            exits[index] = code
            if on_exit is not None and on_exit(index, code):
                return exits
        if pending and on_poll is not None:
            on_poll()
        if pending:
            stop.wait(poll_s)
    return exits


def interrupt(proc: Proc) -> None:
    """Ask a process to stop with SIGINT (nothing when it has already exited)."""
    proc.send_signal(signal.SIGINT)


def close_stdin(proc: Proc) -> None:
    """Ask a process to stop by closing the pipe it reads (e.g. ssh ends the remote side)."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def ask_to_stop(
    procs: Sequence[Proc], grace_s: float, ask: Callable[[Proc], None] = interrupt
) -> list[Proc]:
    """`ask` every process to stop, wait up to `grace_s` in all; those still running then."""
    for proc in procs:
        ask(proc)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    return [proc for proc in procs if proc.poll() is None]


def kill(procs: Sequence[Proc], *, session: bool = False) -> None:
    """SIGKILL every process (with `session`, its whole process group) and reap it."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            if session:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()


def stop(
    procs: Sequence[Proc], grace_s: float = STOP_GRACE_S, ask: Callable[[Proc], None] = interrupt
) -> None:
    """`ask` every process to stop (SIGINT), SIGKILL any still running `grace_s` later."""
    kill(ask_to_stop(procs, grace_s, ask))


@contextlib.contextmanager
def signals_to_event(
    *events: threading.Event, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[threading.Event]:
    """While inside, SIGINT and SIGTERM set `events` (a new one if none) instead of raising.

    Yields the first event; the previous handlers come back on the way out. Main thread only.
    """
    targets = events or (threading.Event(),)

    def handler(signum: int, frame: object) -> None:
        for event in targets:
            event.set()

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield targets[0]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
