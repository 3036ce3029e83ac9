"""`gossipdqn launch`: exact commands, preflight, and whole runs over a real loopback sshd."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from helpers.handshake import HANDSHAKE_FAILED, dial, handshake_outcome
from helpers.sshd_fixture import SshServer, sshd  # noqa: F401  (the fixture)
from helpers.waiting import wait_for

from gossipdqn.cluster.ssh import (
    add_launch_arguments,
    build_plan,
    preflight,
    resolve_env_peers,
    resolve_slurm_peers,
    run_launch,
    start_nodes,
    stop_nodes,
)
from gossipdqn.cluster.supervisor import PIDFILE
from gossipdqn.net.keys import generate_keys
from gossipdqn.node.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = [
    sys.executable, "-c",
    "import argparse, sys\n"
    "from gossipdqn.cluster.ssh import add_launch_arguments, run_launch\n"
    "from gossipdqn.net.keys import generate_keys\n"
    "parser = argparse.ArgumentParser()\nadd_launch_arguments(parser)\n"
    "sys.exit(run_launch(parser.parse_args(), make_keys=generate_keys))",
]  # fmt: skip
"""`gossipdqn launch` as the CLI runs it (fresh CURVE keys), without importing torch."""
HOSTS = "# two loopback hosts\n127.0.0.1 slots=2\n127.0.0.2 slots=1 port=47500\n"
FAKE_NODE = """#!/bin/sh
# Stands in for python: runs the real one, but fakes `-m gossipdqn node`.
if [ "$1 $2 $3" = "-m gossipdqn node" ]; then
    shift 3
    rank=$2
    while [ "$#" -gt 0 ] && [ "$1" != "--run-dir" ]; do shift; done
    echo "fake node $rank up"
    echo "rank $rank" > "$2/out.txt"
    case "$FAKE_MODE" in
        finish) sleep 2; echo "fake node $rank done"; exit 0 ;;
        stubborn) trap '' TERM ;;
    esac
    sleep 300 &
    wait $!
    exit 0
fi
exec {python} "$@"
"""


def parse(argv: list[str]) -> argparse.Namespace:
    """`gossipdqn launch` arguments as the CLI would parse them."""
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    return parser.parse_args(argv)


def processes() -> Iterator[tuple[int, int, str, str]]:
    """(pid, process group, state, command line) of every process on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            yield int(entry.name), int(stat[2]), stat[0], cmdline


def live_processes(tmp: Path, groups: set[int] = frozenset()) -> list[str]:
    """Live (non-zombie) processes in `groups` or naming `tmp` on their command line."""
    return [
        f"{pid} {cmd}"
        for pid, group, state, cmd in processes()
        if state != "Z" and pid != os.getpid() and (group in groups or str(tmp) in cmd)
    ]


def kill_everything(tmp: Path) -> None:
    """Finalizer: SIGKILL every process a test left behind (they all name its tmp dir)."""
    for pid, _, state, cmd in processes():
        if state != "Z" and str(tmp) in cmd and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A tmp dir whose processes are all killed when the test ends, pass or fail."""
    yield tmp_path
    kill_everything(tmp_path)


def launch_argv(tmp: Path, server: SshServer, python: str, *extra: str) -> list[str]:
    """Launcher arguments for a run over the test sshd on two loopback hosts."""
    (tmp / "hosts").write_text(HOSTS)
    return [
        "--hosts", str(tmp / "hosts"), "--run-dir", str(tmp / "run"),
        "--ssh-port", str(server.port), "--ssh-option", server.ssh_option(),
        "--remote-python", python, "--remote-dir", str(tmp), "--env", f"PYTHONPATH={REPO}",
        "--connect-timeout", "5", "--stop-timeout", "3", *extra,
    ]  # fmt: skip


def fake_python(tmp: Path) -> str:
    """Write the stand-in python that fakes the node command."""
    path = tmp / "fakepython"
    path.write_text(FAKE_NODE.format(python=shlex.quote(sys.executable)))
    path.chmod(0o755)
    return str(path)


def start_launcher(tmp: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start the launcher in its own session, its output going to tmp/launch.log."""
    with (tmp / "launch.log").open("wb") as log:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [*LAUNCHER, *argv]
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def node_groups(tmp: Path, ranks: int = 3, timeout: float = 30) -> dict[int, int]:
    """Wait until every node wrote its pid file; rank -> process group."""
    files = [tmp / "run" / f"node-{rank}" / PIDFILE for rank in range(ranks)]
    wait_for(lambda: all(f.exists() and f.read_text().endswith("\n") for f in files), timeout,
             "every node's pid file")  # fmt: skip
    return {rank: int(f.read_text()) for rank, f in enumerate(files)}


def finish(proc: subprocess.Popen[bytes], timeout: float = 40) -> int:
    """The launcher's exit code, killing it if it hangs."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def assert_nothing_left(tmp: Path, groups: dict[int, int]) -> None:
    """No node, supervisor or ssh client of this run is alive."""
    try:
        wait_for(lambda: not live_processes(tmp, set(groups.values())), 10, "the run to end")
    except AssertionError:
        raise AssertionError(f"left alive: {live_processes(tmp, set(groups.values()))}") from None


def test_dry_run_prints_exact_commands(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse([
        "--hosts", "bob@a:2,b", "--run-dir", "runs/x", "--config", "c.toml", "--ssh-port", "2222",
        "--ssh-option", "-i '/k ey' -o Foo=bar", "--remote-python", "/py", "--remote-dir", "/w d",
        "--env", "A=1 2", "--set", "train.total_steps=10", "--base-port", "5000", "--dry-run",
    ])  # fmt: skip
    assert run_launch(args) == 0
    lines = capsys.readouterr().out.splitlines()
    peers = "a:5000,a:5001,b:5000"
    for rank, target in enumerate(["bob@a", "bob@a", "b"]):
        remote = (
            f"cd '/w d' && exec env 'A=1 2' /py -m gossipdqn.cluster.supervisor --pidfile "
            f"runs/x/node-{rank}/node.pgid --grace 15 -- /py -m gossipdqn node --rank {rank} "
            f"--peers {peers} --run-dir runs/x/node-{rank} --bind 0.0.0.0 --config c.toml "
            "--set=train.total_steps=10"
        )
        expected = [
            "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3", "-p", "2222", "-i", "/k ey", "-o", "Foo=bar", target,
            remote,
        ]  # fmt: skip
        assert shlex.split(lines[rank]) == expected
    assert len(lines) == 3


def test_dry_run_hands_out_fresh_keys_unless_given(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--hosts", "a:2,b", "--run-dir", "runs/x", "--remote-dir", "/w", "--dry-run"]
    assert run_launch(parse(argv), make_keys=generate_keys) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    for rank in range(3):
        remote = shlex.split(shlex.split(lines[rank])[-1])
        assert remote[-1] == f'--set=security.keys_dir="runs/x/keys/node-{rank}"'
    for line, (target, mine) in zip(lines[3:], [("a", "node-0 node-1"), ("b", "node-2")]):
        command, comment = line.split("  # ")
        assert comment == f"stdin: keys of {target}" and shlex.split(command)[-2] == target
        assert shlex.split(command)[-1] == (
            "cd /w && umask 077 && mkdir -p runs/x/keys && cd runs/x/keys && "
            f"rm -rf {mine} && tar -xof -"
        )
    assert run_launch(parse([*argv, "--set", "security.keys_dir=k"]), make_keys=generate_keys) == 0
    given = capsys.readouterr().out.splitlines()
    assert len(given) == 3 and all("runs/x/keys" not in line for line in given)


def secrets_of(keys_dir: Path) -> list[str]:
    """The z85 secret keys in every `node-<r>.key_secret` under `keys_dir`."""
    found = [zmq.auth.load_certificate(f)[1] for f in sorted(keys_dir.rglob("*.key_secret"))]
    return [key.decode() for key in found if key]


def assert_keys_private(tmp: Path, ranks: int = 3) -> None:
    """Each node's folder holds its own secret key (0600) and every public key, nothing else;
    no secret is on any command line on this machine or in the launcher's output."""
    keys = tmp / "run" / "keys"
    for rank in range(ranks):
        mine = keys / f"node-{rank}"
        assert stat.S_IMODE(mine.stat().st_mode) == 0o700
        assert [p.name for p in mine.glob("*.key_secret")] == [f"node-{rank}.key_secret"]
        assert stat.S_IMODE((mine / f"node-{rank}.key_secret").stat().st_mode) == 0o600
        assert sorted(p.name for p in (mine / "authorized").iterdir()) == [
            f"node-{r}.key" for r in range(ranks)
        ]
    secrets = secrets_of(keys)
    assert len(set(secrets)) == ranks
    lines = [cmd for _, _, _, cmd in processes()] + [(tmp / "launch.log").read_text()]
    assert not [s for s in secrets if any(s in line for line in lines)]


def test_dry_run_device_iface_include(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("a device=cuda:1 iface=ib0\nb slots=2\nc\n")
    args = parse(["--hosts", str(hosts), "--run-dir", "r", "--exclude", "b", "--dry-run"])
    assert run_launch(args) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "--peers a:47000,c:47000 --run-dir r/node-0 --bind ib0 --device cuda:1" in first
    assert shlex.split(first)[-2] == "a"
    assert "--rank 1 --peers a:47000,c:47000 --run-dir r/node-1 --bind 0.0.0.0" in second


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ("127.0.0.1:1,node-b:1", "would advertise 127.0.0.1, which nodes on 'node-b' cannot reach"),
        ("a:1,a:2", "duplicate host 'a'"),
        ("nofile", "no such hosts file"),
    ],
)
def test_bad_hosts_fail_before_anything(
    hosts: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_launch(parse(["--hosts", hosts, "--run-dir", "r"])) == 2
    assert expected in capsys.readouterr().err


def test_bad_env_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--hosts", "a", "--run-dir", "r", "--env", "1X=2"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


SLURM_ENV = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "gpu[7-8]",
             "SLURM_TASKS_PER_NODE": "2,1"}  # fmt: skip


@pytest.mark.parametrize(
    ("scontrol", "peers"),
    [
        (
            '[ "$1 $2 $3" = "show hostnames gpu[7-8]" ] && printf "alpha\\nbeta\\n"',
            ["alpha:47000", "alpha:47001", "beta:47000"],
        ),
        ("exit 1", ["gpu7:47000", "gpu7:47001", "gpu8:47000"]),
        (None, ["gpu7:47000", "gpu7:47001", "gpu8:47000"]),
    ],
)
def test_resolve_slurm_peers_prefers_scontrol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scontrol: str | None, peers: list[str]
) -> None:
    if scontrol is not None:
        (tmp_path / "scontrol").write_text(f"#!/bin/sh\n{scontrol}\n")
        (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve_slurm_peers(SLURM_ENV) == (2, peers)


def test_resolve_env_peers_from_hosts_file(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("a slots=2\nb port=5000\n")
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}
    assert resolve_env_peers(env, str(tmp_path / "hosts")) == (1, ["a:47000", "a:47001", "b:5000"])


def test_preflight_reports_every_failure(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    argv = launch_argv(workdir, sshd, sys.executable)
    good = build_plan(parse(argv))
    assert preflight(good) == []
    wrong = preflight(good, version="0.0.0-other")
    assert len(wrong) == 2
    assert "127.0.0.2: gossipdqn 0.1.0 there, 0.0.0-other here; expected the same" in wrong[1]
    argv[1] = "127.0.0.1:2,127.0.0.3:1,127.0.0.2"  # nothing listens on 127.0.0.3
    argv[argv.index("--remote-python") + 1] = str(workdir / "missing-python")
    failures = preflight(build_plan(parse(argv)))
    assert [f.split(":")[0] for f in failures] == ["127.0.0.1", "127.0.0.3", "127.0.0.2"]
    assert "remote python failed (exit 127)" in failures[0]
    assert "ssh failed" in failures[1] and "refused" in failures[1]


def test_failed_preflight_starts_nothing(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    argv = launch_argv(workdir, sshd, sys.executable)
    argv[1] = "127.0.0.1:2,127.0.0.3:1"
    proc = start_launcher(workdir, argv)
    assert finish(proc) == 2
    log = (workdir / "launch.log").read_text()
    assert "preflight failed on 1 of 2 hosts; nothing started" in log
    assert not (workdir / "run").exists()


def test_sigint_stops_every_node_everywhere(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    proc = start_launcher(workdir, launch_argv(workdir, sshd, fake_python(workdir)))
    groups = node_groups(workdir)
    log = workdir / "launch.log"
    wait_for(lambda: all(f"[rank {r}] fake node {r} up" in log.read_text() for r in range(3)),
             20, "every node's first line")  # fmt: skip
    assert len(set(groups.values())) == 3 and live_processes(workdir, set(groups.values()))
    assert_keys_private(workdir)
    proc.send_signal(signal.SIGINT)
    assert finish(proc) == 0
    assert_nothing_left(workdir, groups)


def test_a_dead_node_stops_the_rest(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    proc = start_launcher(workdir, launch_argv(workdir, sshd, fake_python(workdir)))
    groups = node_groups(workdir)
    os.killpg(groups[1], signal.SIGKILL)
    assert finish(proc) == 128 + signal.SIGKILL
    assert_nothing_left(workdir, groups)
    assert (
        "rank 1 on 127.0.0.1 exited with code 137; stopping every node"
        in (workdir / "launch.log").read_text()
    )


def test_keep_going_lets_the_rest_finish_and_collects(
    workdir: Path,
    sshd: SshServer,  # noqa: F811
) -> None:
    argv = launch_argv(workdir, sshd, fake_python(workdir), "--keep-going", "--env",
                       "FAKE_MODE=finish", "--collect", str(workdir / "back"))  # fmt: skip
    proc = start_launcher(workdir, argv)
    groups = node_groups(workdir)
    wrote = workdir / "run" / "node-1" / "out.txt"  # the pid file comes before the node's output
    wait_for(lambda: wrote.exists() and wrote.read_text().endswith("\n"), 20, "node 1's output")
    os.killpg(groups[1], signal.SIGKILL)
    assert finish(proc) == 128 + signal.SIGKILL
    log = (workdir / "launch.log").read_text()
    assert "[rank 0] fake node 0 done" in log and "[rank 2] fake node 2 done" in log
    assert "the others go on" in log
    for rank in range(3):
        assert (workdir / "back" / f"node-{rank}" / "out.txt").read_text() == f"rank {rank}\n"
    assert_nothing_left(workdir, groups)


def test_stubborn_node_is_killed_after_grace(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    argv = launch_argv(workdir, sshd, fake_python(workdir), "--env", "FAKE_MODE=stubborn")
    argv[argv.index("--stop-timeout") + 1] = "1"
    proc = start_launcher(workdir, argv)
    groups = node_groups(workdir)
    wait_for(lambda: "fake node 2 up" in (workdir / "launch.log").read_text(), 20, "rank 2")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, timeout=20) == 0
    assert_nothing_left(workdir, groups)


def test_lost_ssh_client_kills_the_remote_group(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    plan = build_plan(parse(launch_argv(workdir, sshd, fake_python(workdir))))
    running = start_nodes(plan)
    try:
        groups = node_groups(workdir)
        os.killpg(running[0].proc.pid, signal.SIGKILL)  # the local ssh client only
        wait_for(lambda: not live_processes(Path("/nonexistent"), {groups[0]}), 10,
                 "rank 0's remote process group to go")  # fmt: skip
        assert live_processes(Path("/nonexistent"), {groups[1], groups[2]})
    finally:
        stop_nodes(plan, running)
    assert_nothing_left(workdir, groups)


def require_node_command() -> None:
    """Skip unless `python -m gossipdqn node` exists yet (it is written alongside the launcher)."""
    if importlib.util.find_spec("gossipdqn.node.node") is None:
        pytest.skip("gossipdqn.node.node is not written yet")
    command = [sys.executable, "-m", "gossipdqn", "node", "--help"]
    if subprocess.run(command, capture_output=True, timeout=60, cwd=REPO).returncode:
        pytest.skip("`gossipdqn node` is not wired into the CLI yet")


def gossip_received(path: Path) -> bool:
    """Whether a node's metrics.jsonl shows messages received from peers."""
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("gossip_recv_msgs", 0) > 0:
                return True
        except json.JSONDecodeError:
            continue
    return False


def cartpole_argv(tmp: Path, server: SshServer, *extra: str) -> list[str]:
    """A CartPole run of three real nodes, long enough to be stopped by the test."""
    settings = [
        "env.id=CartPole-v1", "train.total_steps=1000000", "train.log_every_steps=100",
        "env.num_envs=2", "network.hidden=[32,32]", "learner.learning_starts=100",
        "learner.batch_size=32", "eval.every_steps=0", "checkpoint.every_steps=0",
        "gossip.share_every=50", "gossip.interval=5",
    ]  # fmt: skip
    sets = [word for setting in settings for word in ("--set", setting)]
    return launch_argv(tmp, server, sys.executable, "--quiet", *sets, *extra)


def test_e2e_cartpole_over_ssh_then_sigint(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    require_node_command()
    proc = start_launcher(workdir, cartpole_argv(workdir, sshd))
    groups = node_groups(workdir, timeout=60)
    metrics = [workdir / "run" / f"node-{rank}" / "metrics.jsonl" for rank in range(3)]
    wait_for(lambda: all(gossip_received(m) for m in metrics) or proc.poll() is not None, 120,
             "every node to receive gossip")  # fmt: skip
    assert proc.poll() is None, (workdir / "launch.log").read_text()[-3000:]
    assert_only_the_run_gets_in(workdir)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, timeout=60) == 0, (workdir / "launch.log").read_text()[-3000:]
    for rank in range(3):
        assert (workdir / "run" / f"node-{rank}" / "summary.json").exists()
    assert_nothing_left(workdir, groups)


def assert_only_the_run_gets_in(tmp: Path) -> None:
    """Node 0 of a launch given no keys speaks CURVE: a client with node 1's key is let in,
    a plain client and one whose key is not in the run's set are refused at the handshake."""
    keys = tmp / "run" / "keys" / "node-1"
    server = zmq.auth.load_certificate(keys / "authorized" / "node-0.key")[0]
    member = zmq.auth.load_certificate(keys / "node-1.key_secret")
    generate_keys(tmp / "stranger", 1)
    stranger = zmq.auth.load_certificate(tmp / "stranger" / "node-0.key_secret")
    context = zmq.Context()
    try:
        outcomes = []
        for keys_used in [(server, *member), None, (server, *stranger)]:
            sock, monitor = dial(context, "tcp://127.0.0.1:47000", keys_used)
            outcomes.append(handshake_outcome(monitor, timeout_s=20))
        assert outcomes[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED, outcomes
        assert outcomes[1] & HANDSHAKE_FAILED or outcomes[1] == zmq.EVENT_DISCONNECTED, outcomes
        assert outcomes[2] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, outcomes
    finally:
        context.destroy(linger=0)


def test_e2e_killed_node_stops_the_run(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    require_node_command()
    proc = start_launcher(workdir, cartpole_argv(workdir, sshd))
    groups = node_groups(workdir, timeout=60)
    metrics = workdir / "run" / "node-2" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() or proc.poll() is not None, 60, "rank 2's first metrics")
    os.killpg(groups[2], signal.SIGKILL)
    assert finish(proc, timeout=60) != 0
    assert_nothing_left(workdir, groups)


def test_e2e_allreduce_baseline_over_ssh(workdir: Path, sshd: SshServer) -> None:  # noqa: F811
    require_node_command()
    settings = [
        "env.id=CartPole-v1", "train.total_steps=400", "env.num_envs=2",
        "network.hidden=[16,16]", "learner.learning_starts=100", "learner.batch_size=16",
        "eval.every_steps=0", "eval.final_episodes=1", "checkpoint.every_steps=0",
    ]  # fmt: skip
    sets = [word for setting in settings for word in ("--set", setting)]
    argv = launch_argv(workdir, sshd, sys.executable, "--quiet", "--baseline", "allreduce", *sets)
    proc = start_launcher(workdir, argv)
    assert finish(proc, timeout=120) == 0, (workdir / "launch.log").read_text()[-3000:]
    nets = [
        load_checkpoint(workdir / "run" / f"node-{rank}" / "checkpoint.pt")["learner"]["online"]
        for rank in range(3)
    ]
    assert nets[0].keys() == nets[1].keys() == nets[2].keys()
    for name in nets[0]:
        assert torch.equal(nets[0][name], nets[1][name]) and torch.equal(
            nets[0][name], nets[2][name]
        )
