"""The swarm view: `gossipdqn local` on a terminal (read off a real tmux screen), `--plain` lines
off one, `gossipdqn status` of a finished run, and each node state from what a node dir holds."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.waiting import wait_for

from gossipdqn.cli import main
from gossipdqn.cluster.view import PROCESS_FILE, NodeTail, SwarmView

TINY = [
    "train.total_steps=600", "train.log_every_steps=100", "train.progress_every_s=0.3",
    "learner.learning_starts=100", "learner.batch_size=16", "env.num_envs=2",
    "network.hidden=[16,16]", "eval.every_steps=300", "eval.episodes=1",
    "eval.final_episodes=1", "checkpoint.every_steps=0", "gossip.interval=4",
]  # fmt: skip
"""A two-node CartPole run that trains, evaluates and gossips in a few seconds."""


def local_argv(run_dir: Path, *extra: str) -> list[str]:
    sets = [word for setting in TINY for word in ("--set", setting)]
    return [sys.executable, "-m", "gossipdqn", "local", "-n", "2", "--run-dir", str(run_dir),
            *sets, *extra]  # fmt: skip


def summaries(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"node-{r}" / "summary.json").read_text()) for r in (0, 1)]


def table_rows(screen: str) -> dict[int, list[str]]:
    """rank -> the cells of its row, from the rendered table."""
    rows = {}
    for line in screen.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 12 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run adds it)")
def test_local_on_a_terminal_keeps_one_table_up_to_date(tmp_path: Path) -> None:
    run_dir, sock = tmp_path / "run", str(tmp_path / "tmux.sock")
    tmux = ["tmux", "-S", sock]
    script = f"unset COLUMNS LINES; {shlex.join(local_argv(run_dir))}; echo EXIT=$?; sleep 120"
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "40", script], check=True)
    screens: list[str] = []

    def screen() -> str:
        done = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True)
        screens.append(done.stdout)
        return done.stdout

    try:
        wait_for(lambda: len(table_rows(screen())) == 2, 40, "the table of both nodes")
        assert {cells[-1] for cells in table_rows(screens[-1]).values()} <= {
            "starting", "training"
        }, screens[-1]  # fmt: skip
        wait_for(lambda: "EXIT=" in screen(), 60, "the run to end")
    finally:  # Ctrl-C first, as a person would: `local` then stops its nodes before tmux goes
        if not any("EXIT=" in s for s in screens):
            subprocess.run([*tmux, "send-keys", "C-c"], capture_output=True)
            wait_for(lambda: "EXIT=" in screen(), 30, "the run to stop on Ctrl-C")
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    final = screens[-1]
    assert "EXIT=0" in final, final
    assert final.count("env steps ┃") == 1, final  # redrawn in place, never printed twice
    rows, done = table_rows(final), summaries(run_dir)
    for rank, summary in enumerate(done):
        cells = rows[rank]
        assert cells[1] == socket.gethostname() and cells[-1] == "done", final
        assert cells[2] == f"{summary['env_steps']:,}", final
    assert f"env steps {sum(s['env_steps'] for s in done):,}" in final
    assert "[node 0]  step" not in final  # no progress lines under the table


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished two-node run started with its output on a pipe; its dir and its output."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    done = subprocess.run(local_argv(run_dir), capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return run_dir, done.stdout


@pytest.mark.timeout(90)
def test_off_a_terminal_the_nodes_print_their_lines(plain_run: tuple[Path, str]) -> None:
    _, output = plain_run
    assert "[node 0]  step" in output and "[node 1]  step" in output
    assert "┃" not in output and "\x1b[" not in output


@pytest.mark.timeout(90)
def test_status_prints_the_table_of_a_finished_run(
    plain_run: tuple[Path, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    run_dir, _ = plain_run
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    rows, done = table_rows(out), summaries(run_dir)
    assert sorted(rows) == [0, 1], out
    for rank in (0, 1):
        last = [json.loads(x) for x in (run_dir / f"node-{rank}" / "metrics.jsonl").open()]
        train = [r for r in last if "updates" in r][-1]
        evals = [r["eval_return_mean"] for r in last if r.get("eval_return_mean") is not None]
        assert rows[rank][2] == f"{train['step']:,}" and rows[rank][-1] == "done", out
        assert rows[rank][5] == f"{evals[-1]:.1f}" and rows[rank][8] == str(train["peers_alive"])
    assert f"env steps {sum(s['env_steps'] for s in done):,}" in out
    assert "consensus distance" in out and "2 done" in out


def test_status_of_a_dir_without_nodes_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "no node-<rank> dirs" in capsys.readouterr().err


def write_node(
    path: Path, *, pid: int, starts: int = 1, records: int = 1, started: float = 0.0
) -> None:
    """A node dir whose process `pid` started after the records of earlier starts (if any)."""
    path.mkdir(parents=True)
    lines = [json.dumps({"step": 100 * (i + 1), "updates": i}) for i in range(records)]
    (path / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    offset = (path / "metrics.jsonl").stat().st_size if starts > 1 else 0
    process = {"host": socket.gethostname(), "pid": pid, "started": started, "starts": starts}
    (path / PROCESS_FILE).write_text(json.dumps(process | {"metrics_offset": offset}))


def test_each_state_from_what_the_node_dir_holds(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    write_node(tmp_path / "node-0", pid=os.getpid())
    write_node(tmp_path / "node-1", pid=gone.pid)
    write_node(tmp_path / "node-2", pid=os.getpid(), starts=2, records=2)  # resumed, no new one
    write_node(tmp_path / "node-3", pid=os.getpid())
    (tmp_path / "node-3" / "summary.json").write_text(json.dumps({"steps_to_threshold": 900}))
    write_node(tmp_path / "node-4", pid=os.getpid())
    write_node(tmp_path / "node-5", pid=os.getpid())
    (tmp_path / "node-5" / "summary.json").write_text(json.dumps({"interrupted": True}))
    write_node(tmp_path / "node-6", pid=os.getpid(), started=time.time() + 60)
    (tmp_path / "node-6" / "summary.json").write_text("{}")  # from before this start
    view = SwarmView(tmp_path)
    states = [row.state for row in view.rows()]
    assert states == ["training", "dead", "restarting", "solved", "training", "stopped", "training"]
    assert [row.state for row in view.rows({4: 1})][4] == "dead"  # the launcher saw it fail
    with (tmp_path / "node-2" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 300, "updates": 7}) + "\n")  # the resumed node's first
    row = view.rows()[2]
    assert row.state == "training" and row.record["updates"] == 7


def test_a_half_written_line_waits_for_its_end(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "updates": 0}\n{"step": 2, "upd')
    tail = NodeTail(tmp_path)
    tail.read()
    assert tail.train == {"step": 1, "updates": 0}
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('ates": 5}\n{"step": 2, "eval_return_mean": 9.5}\n')
    tail.read()
    assert tail.train == {"step": 2, "updates": 5} and tail.last_eval == 9.5


@pytest.mark.timeout(90)
def test_tensorboard_shows_each_node_as_a_run_with_a_gossip_group(
    plain_run: tuple[Path, str],
) -> None:
    multiplexer = pytest.importorskip("tensorboard.backend.event_processing.event_multiplexer")
    run_dir, _ = plain_run
    events = multiplexer.EventMultiplexer().AddRunsFromDirectory(str(run_dir))
    events.Reload()
    assert sorted(events.Runs()) == ["node-0", "node-1"]
    for rank in (0, 1):
        records = [json.loads(x) for x in (run_dir / f"node-{rank}" / "metrics.jsonl").open()]
        train = [r for r in records if "updates" in r]
        tags = events.GetAccumulator(f"node-{rank}").Tags()["scalars"]
        assert {"train/loss", "eval/return_mean", "gossip/peers_alive"} <= set(tags)
        assert "gossip/recv_params" in tags and "loss" not in tags
        recv = events.Scalars(f"node-{rank}", "gossip/recv_params")
        assert [(e.step, e.value) for e in recv] == [
            (r["step"], r["gossip_recv_params"]) for r in train
        ]  # fmt: skip
