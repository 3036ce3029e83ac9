"""Start gossipdqn nodes on many hosts over plain ssh, stream their output, stop them all.

Each node runs on its host under `gossipdqn.cluster.supervisor`, which puts the node in its own
process group, records the group id, and stops the whole group when the ssh connection goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import gossipdqn
from gossipdqn.cluster import keyship, procs
from gossipdqn.cluster.hosts import (
    DEFAULT_PORT,
    HostsError,
    NodeAddress,
    check_reachable,
    load_hosts,
    node_addresses,
    select_hosts,
    slurm_nodelist,
    slurm_world,
    torchrun_world,
)
from gossipdqn.cluster.supervisor import PIDFILE

VERSION_PROBE = "import gossipdqn; print(gossipdqn.__version__)"


@dataclass(frozen=True)
class SshSettings:
    """How to reach every host: ssh port, extra options, connect timeout in seconds."""

    port: int | None = None
    options: tuple[str, ...] = ()
    connect_timeout: int = 10

    def command(self, target: str, remote: str) -> list[str]:
        """The ssh argv that runs the shell string `remote` on `target`."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        argv += ["-p", str(self.port)] if self.port is not None else []
        return [*argv, *self.options, target, remote]


@dataclass(frozen=True)
class RemoteSettings:
    """What every host runs and where: python, working directory, run dir, env, node flags."""

    python: str
    directory: str
    run_dir: str
    env: tuple[tuple[str, str], ...] = ()
    node_args: tuple[str, ...] = ()
    grace: float = 15.0
    command: tuple[str, ...] = ("node",)
    """The gossipdqn subcommand each host runs: a gossip node, or an all-reduce worker."""

    def shell(self, argv: Sequence[str]) -> str:
        """`cd DIR && exec env K=V ... ARGV` for the remote login shell."""
        env = [f"{key}={value}" for key, value in self.env]
        return f"cd {shlex.quote(self.directory)} && exec {shlex.join(['env', *env, *argv])}"

    def node_dir(self, rank: int) -> str:
        """The run dir of node `rank` on its host."""
        return str(PurePosixPath(self.run_dir) / f"node-{rank}")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start, watch and stop one multi-host run."""

    nodes: tuple[NodeAddress, ...]
    ssh: SshSettings
    remote: RemoteSettings
    keys: bool = False
    """Each node gets its part of a fresh CURVE key set of the run (see `cluster.keyship`)."""

    def node_command(self, node: NodeAddress) -> list[str]:
        """The exact local argv that starts `node` on its host."""
        remote = self.remote
        argv = [remote.python, "-m", "gossipdqn", *remote.command, "--rank", str(node.rank)]
        argv += ["--peers", ",".join(n.peer for n in self.nodes)]
        argv += ["--run-dir", remote.node_dir(node.rank), "--bind", node.bind]
        argv += ["--device", node.device] if node.device else []
        argv += remote.node_args
        argv += [keyship.node_setting(remote.run_dir, node.rank)] if self.keys else []
        pidfile = f"{remote.node_dir(node.rank)}/{PIDFILE}"
        wrapper = [remote.python, "-m", "gossipdqn.cluster.supervisor", "--pidfile", pidfile]
        wrapper += ["--grace", f"{remote.grace:g}", "--"]
        return self.ssh.command(node.spec.target, remote.shell([*wrapper, *argv]))

    def ranks_on(self, target: str) -> list[int]:
        """The ranks of the nodes that run on `target`."""
        return [n.rank for n in self.nodes if n.spec.target == target]

    def install_keys_command(self, target: str) -> list[str]:
        """The ssh argv that unpacks, from its stdin, the key bundle of `target`'s nodes."""
        script = keyship.install_script(
            self.remote.directory, self.remote.run_dir, self.ranks_on(target)
        )
        return self.ssh.command(target, script)

    def kill_command(self, node: NodeAddress) -> list[str]:
        """The argv that kills `node`'s process group on its host, found through its pid file."""
        pidfile = shlex.quote(f"{self.remote.node_dir(node.rank)}/{PIDFILE}")
        script = f'cd {shlex.quote(self.remote.directory)} && kill -KILL -- -"$(cat {pidfile})"'
        return self.ssh.command(node.spec.target, script)

    def targets(self) -> list[str]:
        """Each distinct ssh destination once, in rank order."""
        return list(dict.fromkeys(node.spec.target for node in self.nodes))


def env_pair(text: str) -> tuple[str, str]:
    """argparse type for `--env KEY=VALUE`."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"'{text}': expected KEY=VALUE, e.g. OMP_NUM_THREADS=1")
    return key, value


def build_plan(args: argparse.Namespace) -> LaunchPlan:
    """Turn parsed `gossipdqn launch` arguments into a plan, checking the host list."""
    hosts = select_hosts(load_hosts(args.hosts), args.include, args.exclude)
    nodes = node_addresses(hosts, args.base_port)
    check_reachable(nodes)
    node_args = ["--config", args.config] if args.config else []
    node_args += [f"--set={item}" for item in args.set]
    node_args += ["--seed", str(args.seed)] if args.seed is not None else []
    node_args += ["--quiet"] if args.quiet else []
    options = tuple(word for option in args.ssh_option for word in shlex.split(option))
    ssh = SshSettings(args.ssh_port, options, args.connect_timeout)
    remote = RemoteSettings(
        args.remote_python,
        args.remote_dir,
        args.run_dir,
        tuple(args.env),
        tuple(node_args),
        args.stop_timeout,
        ("baseline-worker", "--role", "allreduce") if args.baseline == "allreduce" else ("node",),
    )
    return LaunchPlan(tuple(nodes), ssh, remote)


def preflight(plan: LaunchPlan, version: str = gossipdqn.__version__) -> list[str]:
    """Check every host answers over ssh and runs `version`; return every failure at once."""
    probe = plan.remote.shell([plan.remote.python, "-c", VERSION_PROBE])
    timeout = plan.ssh.connect_timeout + 30
    targets = plan.targets()
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        found = pool.map(lambda t: _probe(t, plan.ssh.command(t, probe), version, timeout), targets)
        return [failure for failure in found if failure]


def _probe(target: str, argv: list[str], version: str, timeout: float) -> str | None:
    """One host's preflight: None when fine, else what went wrong."""
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"{target}: no answer within {timeout:g} s"
    except OSError as exc:
        return f"{target}: cannot run ssh ({exc})"
    tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
    if done.returncode == 255:
        return f"{target}: ssh failed: {tail}"
    if done.returncode:
        return f"{target}: remote python failed (exit {done.returncode}): {tail}"
    found = (done.stdout.strip().splitlines() or ["nothing"])[-1]
    if found != version:
        return f"{target}: gossipdqn {found} there, {version} here; expected the same version"
    return None


def start_nodes(plan: LaunchPlan) -> list[procs.Child]:
    """Start every node's ssh client in its own session, each output line prefixed by rank."""
    commands = [plan.node_command(node) for node in plan.nodes]
    prefixes = [f"[rank {node.rank}] " for node in plan.nodes]
    return procs.start_group(commands, prefixes, pipe_stdin=True, new_session=True)


def watch(
    plan: LaunchPlan, running: Sequence[procs.Child], stop: threading.Event, keep_going: bool
) -> int:
    """Wait until every node ends or `stop` is set; stop early at a fatal exit unless keep_going."""

    def fatal(index: int, code: int) -> bool:
        if code:
            node = plan.nodes[index]
            why = "ssh failed" if code == 255 else f"exited with code {code}"
            then = "; the others go on" if keep_going else "; stopping every node"
            _say(f"rank {node.rank} on {node.spec.target} {why}{then}")
        return bool(code) and not keep_going

    exits = procs.watch([child.proc for child in running], stop, on_exit=fatal)
    return next((code for code in exits.values() if code), 0)


def stop_nodes(plan: LaunchPlan, running: Sequence[procs.Child]) -> None:
    """Ask every live node to stop (end its ssh stdin), then kill what is left, remotely too."""
    grace = plan.remote.grace + plan.ssh.connect_timeout
    clients = [child.proc for child in running]
    stuck = procs.ask_to_stop(clients, grace, ask=procs.close_stdin)
    if stuck:
        nodes = [node for node, proc in zip(plan.nodes, clients) if proc in stuck]
        _say(f"ranks {[node.rank for node in nodes]} did not stop in {grace:g} s; killing")
        timeout = plan.ssh.connect_timeout + 10
        with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
            list(pool.map(lambda node: _run_quietly(plan.kill_command(node), timeout), nodes))
    procs.kill(stuck, session=True)
    procs.join_output(running, timeout_s=5)


def _run_quietly(argv: list[str], timeout: float) -> None:
    """Run a best-effort command, ignoring its output and failure."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def collect(plan: LaunchPlan, dest: Path) -> list[str]:
    """Copy every node's run dir back into `dest` (tar over ssh); return what failed."""
    dest.mkdir(parents=True, exist_ok=True)
    failures = []
    for target in plan.targets():
        names = [f"node-{n.rank}" for n in plan.nodes if n.spec.target == target]
        tar = ["tar", "-C", plan.remote.run_dir, "-cf", "-", *names]
        failure = _untar_from(plan.ssh.command(target, plan.remote.shell(tar)), dest)
        failures += [f"{target}: {failure}"] if failure else []
    return failures


def _untar_from(argv: list[str], dest: Path) -> str | None:
    """Extract the tar stream `argv` writes into `dest`; None when fine, else what failed."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            archive.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        return f"bad archive ({exc})"
    finally:
        proc.stdout.close()
        proc.wait()
    return f"copy failed (exit {proc.returncode})" if proc.returncode else None


def run_launch(args: argparse.Namespace, make_keys: keyship.KeyMaker | None = None) -> int:
    """`gossipdqn launch`: preflight, start every node, stream, stop all; the exit code.

    With `make_keys` (the CLI passes `gossipdqn.net.keys.generate_keys`), a run without
    `security.keys_dir` gets a fresh CURVE key set, handed to each host before its nodes start.
    """
    try:
        plan = build_plan(args)
    except HostsError as exc:
        _say(f"error: {exc}")
        return 2
    keys = make_keys is not None and args.baseline is None and not keyship.keys_given(args)
    plan = replace(plan, keys=keys)
    if args.dry_run:
        for node in plan.nodes:
            print(shlex.join(plan.node_command(node)))
        for target in plan.targets() if keys else []:
            print(f"{shlex.join(plan.install_keys_command(target))}  # stdin: keys of {target}")
        return 0
    try:
        failures = preflight(plan)
    except KeyboardInterrupt:
        _say("interrupted during preflight; nothing started")
        return 130
    if failures:
        _say(f"preflight failed on {len(failures)} of {len(plan.targets())} hosts; nothing started")
        for failure in failures:
            _say(f"  {failure}")
        return 2
    if keys and make_keys is not None and not _hand_out_keys(plan, make_keys):
        return 2
    _say(f"starting {len(plan.nodes)} nodes on {len(plan.targets())} hosts")
    with procs.signals_to_event() as stop:
        running = start_nodes(plan)
        try:
            code = watch(plan, running, stop, args.keep_going)
        finally:
            stop_nodes(plan, running)
    if args.collect is not None:
        for failure in collect(plan, Path(args.collect or args.run_dir)):
            _say(f"collect: {failure}")
            code = code or 1
    return code


def _hand_out_keys(plan: LaunchPlan, make_keys: keyship.KeyMaker) -> bool:
    """A fresh CURVE key set, each host's part sent over ssh; False (said why) on a failure."""
    failures = keyship.hand_out(
        make_keys, {t: plan.ranks_on(t) for t in plan.targets()}, plan.install_keys_command,
        plan.ssh.connect_timeout + 30,
    )  # fmt: skip
    for failure in failures:
        _say(f"  {failure}")
    if failures:
        _say(f"could not hand out CURVE keys to {len(failures)} hosts; nothing started")
    else:
        _say(f"fresh CURVE keys for {len(plan.nodes)} nodes handed out over ssh")
    return not failures


def _say(message: str) -> None:
    """A launcher message on stderr."""
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `gossipdqn launch`."""
    add = parser.add_argument
    add("--hosts", required=True, help="hosts file, or inline list like a:2,b:2")
    add("--config", help="config file, as the remote side sees it")
    add("--run-dir", required=True, help="run dir on each host; node R writes RUN_DIR/node-R")
    add(
        "--base-port",
        type=int,
        default=DEFAULT_PORT,
        help="first node port of a host (%(default)s)",
    )
    add("--include", help="only these hosts (comma separated names from the host list)")
    add("--exclude", help="all hosts but these (comma separated names from the host list)")
    add("--ssh-port", type=int, help="ssh port of every host (default: ssh's own)")
    add("--ssh-option", action="append", default=[], help='extra ssh options, e.g. "-i KEY"')
    add("--connect-timeout", type=int, default=10, help="ssh connect timeout, seconds")
    add("--remote-python", default=sys.executable, help="python on the hosts (%(default)s)")
    add("--remote-dir", default=os.getcwd(), help="working dir on the hosts (%(default)s)")
    add("--env", action="append", type=env_pair, default=[], help="KEY=VALUE for every node")
    add("--set", action="append", default=[], help="section.key=value for every node")
    add("--seed", type=int, help="seed passed to every node")
    add("--quiet", action="store_true", help="no progress lines from the nodes")
    add(
        "--baseline",
        choices=("allreduce",),
        help="start the all-reduce baseline's workers on these hosts instead of gossip nodes",
    )
    add("--keep-going", action="store_true", help="a node's failure does not stop the others")
    add("--stop-timeout", type=float, default=15.0, help="seconds a node gets to stop cleanly")
    add("--dry-run", action="store_true", help="print the exact ssh commands and exit")
    add("--collect", nargs="?", const="", help="copy run dirs back here (default: --run-dir)")


def resolve_slurm_peers(
    env: Mapping[str, str], default_port: int = DEFAULT_PORT
) -> tuple[int, list[str]]:
    """`gossipdqn node --slurm`: this task's rank and every task's `host:port`."""
    nodelist = slurm_nodelist(env)
    names = _scontrol_hostnames(nodelist) if nodelist and shutil.which("scontrol") else None
    world = slurm_world(env, default_port, names)
    return world.rank, list(world.peers)


def _scontrol_hostnames(nodelist: str) -> list[str] | None:
    """Slurm's own expansion of a node list, or None when scontrol cannot give it."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return done.stdout.split() or None


def resolve_env_peers(
    env: Mapping[str, str], hosts: str, default_port: int = DEFAULT_PORT
) -> tuple[int, list[str]]:
    """torchrun style: rank from RANK / WORLD_SIZE, peers from a hosts file or inline list."""
    world = torchrun_world(env, load_hosts(hosts), default_port)
    return world.rank, list(world.peers)
