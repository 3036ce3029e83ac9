"""The `gossipdqn` command: train, eval, node, local and the rest."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gossipdqn import __version__
from gossipdqn.cluster.hosts import HostsError
from gossipdqn.cluster.local import run_local
from gossipdqn.cluster.procs import signals_to_event
from gossipdqn.cluster.ssh import (
    add_launch_arguments,
    resolve_env_peers,
    resolve_slurm_peers,
    run_launch,
)
from gossipdqn.cluster.view import live_view, print_status, wants_live_view
from gossipdqn.config import Config, ConfigError, load_config
from gossipdqn.dqn.envs import EnvError, import_env_modules
from gossipdqn.gossip.nodes import gossip_node
from gossipdqn.net.keys import SecurityError, generate_keys
from gossipdqn.net.transport import TransportError
from gossipdqn.node.checkpoint import CHECKPOINT_NAME, evaluate_checkpoint
from gossipdqn.node.node import Node


class UsageError(Exception):
    """A user's mistake: printed as one line, exit code 2, no traceback."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command takes."""
    parser.add_argument("--config", type=Path, help="TOML config (default: the CartPole config)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set learner.lr=1e-3 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="seed (overrides the config's)")
    parser.add_argument("--device", help="learner device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--run-dir", type=Path, help="output directory (default runs/NAME-TIME)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def resolve_config(args: argparse.Namespace) -> Config:
    """The config a run uses: its file (or the resumed run's), then --set, --seed, --device."""
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f'learner.device="{args.device}"')
    if args.resume is not None:
        saved = args.resume / "config.toml"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: no config.toml there; expected a run dir")
        return load_config(saved, overrides)
    return load_config(args.config, overrides)


def resolve_run_dir(args: argparse.Namespace, cfg: Config) -> Path:
    if args.resume is not None:
        return args.resume
    return args.run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_node(node: Node, args: argparse.Namespace) -> dict:
    """Restore when resuming, run until done or signalled (SIGINT, SIGTERM), close; the summary."""
    with signals_to_event() as stop:
        try:
            if args.resume is not None and (args.resume / CHECKPOINT_NAME).is_file():
                node.restore(args.resume / CHECKPOINT_NAME)
            return node.run(stop)
        finally:
            node.close()


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    run_dir = resolve_run_dir(args, cfg)
    if not args.quiet:
        print(f"gossipdqn: training {cfg.env.id} into {run_dir}", flush=True)
    summary = run_node(Node(cfg, run_dir, quiet=args.quiet), args)
    if not args.quiet:
        print(json.dumps(summary, indent=2))
    return 0


def parse_peers(text: str) -> list[str]:
    """`host:port,host:port,...` in rank order."""
    peers = [p.strip() for p in text.split(",") if p.strip()]
    for peer in peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--peers: {peer!r} is not host:port (port 1-65535)")
    if len(set(peers)) != len(peers):
        raise UsageError("--peers: an address is listed twice; expected one per node")
    return peers


def add_peer_arguments(parser: argparse.ArgumentParser, rank_help: str) -> None:
    """Where a process of a multi-process run sits: --rank and --peers, --slurm, or --hosts."""
    add = parser.add_argument
    add("--rank", type=int, help=rank_help)
    add("--peers", help="host:port of every process of the run, in rank order")
    add("--bind", help="address or interface to bind (default: the peer host)")
    add("--slurm", action="store_true", help="rank and peers from Slurm (srun)")
    add("--hosts", help="torchrun style: peers from this hosts file, rank from RANK")


def node_peers(args: argparse.Namespace) -> list[str]:
    """The node's rank (set on `args`) and peer list: from --slurm, RANK + --hosts, or flags."""
    if args.slurm:
        args.rank, peers = resolve_slurm_peers(os.environ)
        args.bind = args.bind or "0.0.0.0"  # a Slurm host name may resolve to 127.0.1.1 locally
        return peers
    if args.hosts:
        args.rank, peers = resolve_env_peers(os.environ, args.hosts)
        return peers
    if args.rank is None or args.peers is None:
        raise UsageError("expected --rank with --peers, or --slurm, or --hosts with RANK set")
    return parse_peers(args.peers)


def cmd_node(args: argparse.Namespace) -> int:
    peers = node_peers(args)
    if not 0 <= args.rank < len(peers):
        raise UsageError(f"--rank {args.rank}: expected 0..{len(peers) - 1} for {len(peers)} peers")
    cfg = resolve_config(args)
    run_dir = resolve_run_dir(args, cfg)
    node = gossip_node(
        cfg, run_dir, rank=args.rank, addresses=peers, bind_host=args.bind,
        run_id=args.run_id, resumed=args.resume is not None, quiet=args.quiet,
    )  # fmt: skip
    run_node(node, args)
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise UsageError(f"-n {args.n}: expected at least 1 node")
    cfg = resolve_config(args)
    import_env_modules(cfg.env.imports)  # a module that cannot be imported fails before any node
    run_dir = args.resume or args.run_dir or resolve_run_dir(args, cfg)
    passthrough = forwarded_options(args)
    if not args.quiet:
        print(f"gossipdqn: {args.n} nodes training {cfg.env.id} into {run_dir}", flush=True)
    live = wants_live_view(args.plain, args.quiet)
    with signals_to_event() as stop:
        resume = args.resume is not None
        code = run_local(args.n, run_dir, passthrough, stop, resume=resume, live=live)
    if not args.quiet:
        print_local_summary(json.loads((run_dir / "summary.json").read_text()))
    return code


def cmd_launch(args: argparse.Namespace) -> int:
    """`gossipdqn launch`; on a terminal, a live table of the node dirs of the run seen here."""
    launch = functools.partial(run_launch, make_keys=generate_keys)
    if args.dry_run or not wants_live_view(args.plain, args.quiet):
        return launch(args)
    args.quiet = True  # the table takes the place of the nodes' progress lines
    with live_view(Path(args.remote_dir, args.run_dir)):
        return launch(args)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise UsageError(f"{args.run_dir}: no such directory; expected a run dir")
    if print_status(args.run_dir) == 0:
        raise UsageError(f"{args.run_dir}: no node-<rank> dirs; expected a run dir")
    return 0


def print_local_summary(summary: dict) -> None:
    """One line per node: exit code, final evaluation, env steps and seconds to the threshold."""
    for node in summary["nodes"]:
        s = node["summary"] or {}
        print(
            f"[node {node['rank']}] exit {node['exit_code']}  "
            f"final eval {s.get('final_eval_return_mean')}  "
            f"steps to threshold {s.get('steps_to_threshold')}  "
            f"seconds to threshold {s.get('seconds_to_threshold')}"
        )


def forwarded_options(args: argparse.Namespace) -> list[str]:
    """The run options a launcher hands on to each process it starts (a resumed run keeps
    its saved config, so only --set and --quiet travel then)."""
    out = [a for o in args.overrides for a in ("--set", o)]
    for flag, value in (
        ("--config", args.config),
        ("--seed", args.seed),
        ("--device", args.device),
    ):
        if value is not None and args.resume is None:
            out += [flag, str(value)]
    return out + (["--quiet"] if args.quiet else [])


def cmd_baseline(args: argparse.Namespace) -> int:
    from gossipdqn.baselines import run

    if args.resume is not None:
        raise UsageError("--resume: baselines start fresh; expected --run-dir")
    if getattr(args, "n", 1) < 1 or getattr(args, "actors_scale", 1) < 1:
        raise UsageError("-n and --actors-scale: expected at least 1")
    cfg = resolve_config(args)
    run_dir = resolve_run_dir(args, cfg)
    if args.mode == "single":
        cfg = run.scale_actors(cfg, args.actors_scale)
        run_node(Node(cfg, run_dir / "node-0", quiet=args.quiet, label="[single]"), args)
        run.write_summary(run_dir, "single", [0], {"actors_scale": args.actors_scale})
        return 0
    passthrough = forwarded_options(args)
    with signals_to_event() as stop:
        if args.mode == "ps":
            commands = run.ps_commands(args.n, run_dir, passthrough, args.pull_every)
            codes, _ = run.run_group(commands, stop, workers=slice(1, None))
            codes = codes[1:]
        else:
            commands = run.allreduce_commands(args.n, run_dir, passthrough)
            codes, _ = run.run_group(commands, stop, workers=slice(None))
    summary = run.write_summary(run_dir, args.mode, codes, {})
    if not args.quiet:
        print(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


def cmd_baseline_worker(args: argparse.Namespace) -> int:
    from gossipdqn.baselines.run import run_worker

    peers = node_peers(args)
    if not 0 <= args.rank < len(peers):
        raise UsageError(f"--rank {args.rank}: expected 0..{len(peers) - 1} for {len(peers)} peers")
    cfg = resolve_config(args)
    with signals_to_event() as stop:
        return run_worker(
            args.role, cfg, resolve_run_dir(args, cfg), args.rank, peers, stop=stop,
            bind=args.bind, quiet=args.quiet, pull_every=args.pull_every,
        )  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    from gossipdqn.report import ReportError, write_report

    try:
        written = write_report(args.run_dirs, args.out)
    except ReportError as e:
        raise UsageError(str(e)) from None
    for path in written:
        print(path)
    return 0


def add_baseline_parsers(sub: argparse._SubParsersAction) -> None:
    """`baseline single|ps|allreduce`, `baseline-worker` (one of their processes), `report`."""
    baseline = sub.add_parser("baseline", help="centralized baselines: single, ps, allreduce")
    modes = baseline.add_subparsers(dest="mode", required=True, metavar="MODE")
    single = modes.add_parser("single", help="one node (with --actors-scale N, N times the actors)")
    single.add_argument("--actors-scale", type=int, default=1, help="actors and budgets times N")
    ps = modes.add_parser("ps", help="a parameter server and N workers (Gorila style)")
    ps.add_argument("-n", type=int, default=2, help="number of workers (default 2)")
    ps.add_argument("--pull-every", type=int, default=1, help="updates between parameter pulls")
    allreduce = modes.add_parser(
        "allreduce", help="N workers averaging gradients (torch.distributed)"
    )
    allreduce.add_argument("-n", type=int, default=2, help="number of workers (default 2)")
    for parser in (single, ps, allreduce):
        add_run_arguments(parser)
        parser.set_defaults(func=cmd_baseline)

    worker = sub.add_parser("baseline-worker", help="one process of a baseline (used by baseline)")
    worker.add_argument("--role", required=True, choices=("ps-server", "ps-worker", "allreduce"))
    add_peer_arguments(worker, "position in --peers (ps: 0 is the server)")
    worker.add_argument("--pull-every", type=int, default=1, help="ps: updates between pulls")
    add_run_arguments(worker)
    worker.set_defaults(func=cmd_baseline_worker)

    report = sub.add_parser("report", help="plots and a markdown table from finished runs")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=Path("report"), help="output dir (report)")
    report.set_defaults(func=cmd_report)


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        cfg, result = evaluate_checkpoint(
            args.checkpoint, args.episodes, seed=args.seed, eps=args.eps, device=args.device
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(result._asdict()))
    else:
        print(f"{cfg.env.id}: return {result.mean:.2f} +- {result.std:.2f} over {args.episodes}"
              f" episodes of {sum(result.lengths) / len(result.lengths):.0f} steps on average,"
              f" {sum(result.truncated)} ended by the time limit")  # fmt: skip
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: expected at least 1")
    generate_keys(args.dir, args.nodes)
    print(
        f"gossipdqn: {args.nodes} CURVE key pairs in {args.dir} (secret keys mode 0600), public "
        f"keys in {args.dir / 'authorized'}; give every node security.keys_dir={args.dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gossipdqn", description="Decentralized deep Q-learning over ZeroMQ gossip."
    )
    parser.add_argument("--version", action="version", version=f"gossipdqn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train one node on this machine")
    add_run_arguments(train)
    train.set_defaults(func=cmd_train)

    node = sub.add_parser("node", help="run one gossip node (rank R of a peer list)")
    add_peer_arguments(node, "this node's position in --peers")
    node.add_argument("--run-id", help="id shared by every node of a run (default: derived)")
    add_run_arguments(node)
    node.set_defaults(func=cmd_node)

    local = sub.add_parser("local", help="run N gossip nodes as processes on this machine")
    local.add_argument("-n", type=int, default=4, help="number of nodes (default 4)")
    local.add_argument("--plain", action="store_true", help="progress lines, not a live table")
    add_run_arguments(local)
    local.set_defaults(func=cmd_local)

    status = sub.add_parser("status", help="the table of a running or finished run's nodes")
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    status.set_defaults(func=cmd_status)

    launch = sub.add_parser("launch", help="start nodes on many hosts over ssh")
    add_launch_arguments(launch)
    launch.add_argument("--plain", action="store_true", help="node lines, not a live table")
    launch.set_defaults(func=cmd_launch)

    ev = sub.add_parser("eval", help="greedy evaluation of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help="checkpoint file or run dir")
    ev.add_argument("--episodes", type=int, default=20)
    ev.add_argument("--seed", type=int, default=12345)
    ev.add_argument("--eps", type=float, default=0.0, help="epsilon of the evaluation policy")
    ev.add_argument("--device", help="device to load the network on")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=cmd_eval)

    keys = sub.add_parser("keys", help="CURVE keys that authenticate and encrypt gossip")
    keys_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = keys_actions.add_parser("generate", help="one key pair per node, plus authorized/")
    generate.add_argument("dir", type=Path, metavar="DIR", help="directory to write the keys to")
    generate.add_argument("--nodes", type=int, required=True, help="number of nodes (ranks)")
    generate.set_defaults(func=cmd_keys)
    add_baseline_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, ConfigError, EnvError, HostsError, SecurityError, TransportError) as e:
        print(f"gossipdqn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
