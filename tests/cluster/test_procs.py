"""The process supervisor on real child processes: output, exit codes, stopping, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gossipdqn.cluster import procs

WAIT_S = 30.0
"""Hard limit on any wait for a child in these tests."""
UNTIL_STDIN_ENDS = "import sys; sys.stdin.read()"
POLITE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, lambda *_: sys.exit(0))\n"
    "print('ready', flush=True)\ntime.sleep(120)"
)
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('ready', flush=True)\ntime.sleep(120)"
)
WITH_GRANDCHILD = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('grandchild', child.pid, flush=True)\nchild.wait()"
)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class Lines:
    """A stand-in for our stdout: keeps what is written, wakes whoever waits for a text."""

    def __init__(self) -> None:
        self.text = ""
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            self.text += text
            self.changed.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def wait_for(self, needle: str, timeout: float = WAIT_S) -> None:
        with self.changed:
            found = self.changed.wait_for(lambda: needle in self.text, timeout)
        assert found, f"no {needle!r} within {timeout} s in output {self.text!r}"


def our_stdout(monkeypatch: pytest.MonkeyPatch) -> Lines:
    """Children started from now on copy their output here (called in the test: pytest resets
    sys.stdout between a fixture's setup and the test)."""
    lines = Lines()
    monkeypatch.setattr(sys, "stdout", lines)
    return lines


@pytest.fixture
def start() -> Iterator[Callable[..., list[procs.Child]]]:
    """`procs.start_group`; every process it started is killed when the test ends, pass or fail."""
    started: list[tuple[procs.Child, bool]] = []

    def run(commands: list[list[str]], *args: object, **kw: bool) -> list[procs.Child]:
        children = procs.start_group(commands, *args, **kw)  # type: ignore[arg-type]
        started.extend((child, kw.get("new_session", False)) for child in children)
        return children

    yield run
    for child, session in started:
        with contextlib.suppress(ProcessLookupError):
            if session:
                os.killpg(child.proc.pid, signal.SIGKILL)
            else:
                child.proc.kill()
        child.proc.wait()


@pytest.fixture
def never() -> Iterator[threading.Event]:
    """A stop event only a hard timeout sets: a watch on it cannot hang the test."""
    stop = threading.Event()
    timer = threading.Timer(WAIT_S, stop.set)
    timer.start()
    yield stop
    timer.cancel()


def popens(children: list[procs.Child]) -> list[subprocess.Popen[bytes]]:
    return [child.proc for child in children]


def test_output_is_copied_line_by_line_with_each_prefix(
    monkeypatch: pytest.MonkeyPatch, start, never
) -> None:
    out = our_stdout(monkeypatch)
    lines = "import sys; print('one'); sys.stdout.write('two\\r\\nthree'); sys.stdout.flush()"
    undecodable = (
        "import sys; sys.stdout.buffer.write(b'\\xff bad\\n'); print('err', file=sys.stderr)"
    )
    children = start([py(lines), py(undecodable)], ["[node 3] ", ""])
    assert procs.watch(popens(children), never) == {0: 0, 1: 0}
    procs.join_output(children, timeout_s=WAIT_S)
    got = out.text.splitlines()
    assert [line for line in got if line.startswith("[node 3] ")] == [
        "[node 3] one", "[node 3] two", "[node 3] three",
    ]  # fmt: skip
    assert sorted(line for line in got if not line.startswith("[node 3] ")) == ["err", "\ufffd bad"]
    assert out.text.endswith("\n")  # a last line without its newline still gets one


def test_watch_reports_every_exit_code(start, never) -> None:
    codes = ["import sys; sys.exit(3)", "pass", "import os; os.kill(os.getpid(), 9)"]
    exits = procs.watch(popens(start([py(code) for code in codes])), never)
    assert not never.is_set()
    assert exits == {0: 3, 1: 0, 2: -signal.SIGKILL}


def test_watch_can_stop_at_the_first_exit_and_ssh_style_stop(start, never) -> None:
    children = start([py("import sys; sys.exit(5)"), py(UNTIL_STDIN_ENDS)], pipe_stdin=True)
    seen: list[tuple[int, int]] = []

    def first(index: int, code: int) -> bool:
        seen.append((index, code))
        return True

    assert procs.watch(popens(children), never, on_exit=first) == {0: 5}
    assert seen == [(0, 5)] and not never.is_set()
    assert children[1].proc.poll() is None
    left = procs.ask_to_stop(popens(children), WAIT_S, ask=procs.close_stdin)
    assert left == [] and children[1].proc.returncode == 0


def test_watch_calls_its_hook_each_poll_and_ends_on_stop(start) -> None:
    children = start([py(UNTIL_STDIN_ENDS)], pipe_stdin=True)
    stop, polls = threading.Event(), []

    def hook() -> None:
        polls.append(time.monotonic())
        if len(polls) == 3:
            stop.set()

    assert procs.watch(popens(children), stop, on_poll=hook, poll_s=0.01) == {}
    assert len(polls) == 3 and children[0].proc.poll() is None


def test_a_child_ignoring_sigint_is_killed_after_the_grace(
    monkeypatch: pytest.MonkeyPatch, start
) -> None:
    out = our_stdout(monkeypatch)
    polite, stubborn = start([py(POLITE), py(STUBBORN)], ["[polite] ", "[stubborn] "])
    out.wait_for("[polite] ready")
    out.wait_for("[stubborn] ready")
    began = time.monotonic()
    procs.stop([polite.proc, stubborn.proc], grace_s=1.0)
    took = time.monotonic() - began
    assert polite.proc.returncode == 0 and stubborn.proc.returncode == -signal.SIGKILL
    assert 1.0 <= took < WAIT_S


def test_ask_to_stop_returns_what_outlived_one_shared_grace(
    monkeypatch: pytest.MonkeyPatch, start
) -> None:
    out = our_stdout(monkeypatch)
    children = start([py(STUBBORN), py(STUBBORN), py(POLITE)], ["[a] ", "[b] ", "[c] "])
    for name in "abc":
        out.wait_for(f"[{name}] ready")
    began = time.monotonic()
    left = procs.ask_to_stop(popens(children), grace_s=1.0)
    assert 1.0 <= time.monotonic() - began < 1.0 + 0.9  # one grace for all, not one each
    assert left == popens(children)[:2] and children[2].proc.returncode == 0
    procs.kill(left)
    assert [child.proc.returncode for child in children[:2]] == [-signal.SIGKILL] * 2


def test_kill_with_session_takes_the_whole_process_group(
    monkeypatch: pytest.MonkeyPatch, start
) -> None:
    out = our_stdout(monkeypatch)
    (child,) = start([py(WITH_GRANDCHILD)], new_session=True)
    out.wait_for("grandchild ")
    procs.kill([child.proc], session=True)
    assert child.proc.returncode == -signal.SIGKILL
    procs.join_output([child], timeout_s=WAIT_S)  # the grandchild held the pipe: EOF means gone
    assert not child.reader.is_alive()


def test_a_failed_start_kills_what_did_start(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, **kw)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    try:
        with pytest.raises(FileNotFoundError):
            procs.start_group([py(UNTIL_STDIN_ENDS), ["/nonexistent/gossipdqn-test-binary"]],
                              pipe_stdin=True)  # fmt: skip
        assert len(made) == 1 and made[0].returncode == -signal.SIGKILL
    finally:
        for proc in made:
            proc.kill()
            proc.wait()


def test_prefixes_must_match_commands() -> None:
    with pytest.raises(ValueError, match="2 prefixes for 1 commands"):
        procs.start_group([py("pass")], ["a", "b"])


@pytest.fixture
def saved_handlers() -> Iterator[None]:
    """Whatever a test does to the SIGINT and SIGTERM handlers is undone after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_to_event_sets_it_then_restores_the_handler(saved_handlers, sig) -> None:
    before: list[int] = []
    called = threading.Event()

    def previous(signum: int, frame: object) -> None:
        before.append(signum)
        called.set()

    signal.signal(sig, previous)
    with procs.signals_to_event() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), sig)
        assert stop.wait(WAIT_S)
    assert signal.getsignal(sig) is previous and before == []
    os.kill(os.getpid(), sig)
    assert called.wait(WAIT_S) and before == [sig]


def test_signals_to_event_sets_every_event_given(saved_handlers) -> None:
    first, second = threading.Event(), threading.Event()
    with procs.signals_to_event(first, second) as stop:
        assert stop is first
        os.kill(os.getpid(), signal.SIGTERM)
        assert first.wait(WAIT_S) and second.wait(WAIT_S)


def test_signals_to_event_restores_handlers_when_the_body_raises(saved_handlers) -> None:
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError), procs.signals_to_event():
        assert signal.getsignal(signal.SIGINT) is not handler
        raise RuntimeError
    assert signal.getsignal(signal.SIGINT) is handler
