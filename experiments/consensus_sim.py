"""Scale on paper: push-sum consensus over gossipdqn's topologies at up to thousands of nodes.

No environments, no sockets: every node holds a small random vector, and each round the
project's own `topology.peer_table` says who sends to whom while `mixing.push_sum_share` and
`mixing.push_sum_receive` do the averaging, batched over all nodes as one (N, D) matrix.
We count rounds until the consensus error max_i ||theta_i - mean|| / max_i ||theta_i(0) - mean||
falls below eps, compare with the spectral-gap prediction, and set the bytes each node moves per
round beside a parameter server's.

    python experiments/consensus_sim.py --sizes 16 64 256 1024 4096 \
        --out experiments/results/consensus_sim

`--faults` runs the node's own mixing code instead (`gossipdqn.gossip.simulation`: the same
`Mixer`, link totals, incarnation rules and topology a gossip node uses, one message at a time)
on 16 nodes for 2,000 rounds, with and without 30% of messages dropped, duplicated or delayed,
a node restarted twice (from its checkpoint, then fresh) and a partition that heals:

    python experiments/consensus_sim.py --faults --out experiments/results/consensus_sim
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gossipdqn.gossip.mixing import push_sum_receive, push_sum_share
from gossipdqn.gossip.simulation import FaultModel, Restart, Swarm, gossip_settings
from gossipdqn.gossip.topology import TOPOLOGIES, exponential_period, mixing_matrix, peer_table


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


MODEL_PARAMS = {
    # CartPole MLP 4 -> 256 -> 256 -> 2
    "cartpole_mlp": _linear(4, 256) + _linear(256, 256) + _linear(256, 2),
    # Nature CNN on 4x84x84 frames, 6 actions (Pong): 3 convs, 3136 -> 512 -> 6
    "nature_cnn": _conv(4, 32, 8)
    + _conv(32, 64, 4)
    + _conv(64, 64, 3)
    + _linear(3136, 512)
    + _linear(512, 6),
}
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Row:
    """One (topology, N) result."""

    topology: str
    world: int
    degree: int
    rounds: int | None
    """Simulated rounds to eps; None when not reached within max_rounds."""
    predicted: int | None
    """Spectral-gap prediction; None when the eigenvalues were not computed."""
    lambda2: float | None
    """Second largest |eigenvalue| per round (geometric mean over a period)."""
    seconds: float


def initial_state(world: int, dim: int, seed: int) -> torch.Tensor:
    """The nodes' starting parameters: a (world, dim) float64 standard normal matrix."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(world, dim, generator=generator, dtype=torch.float64)


def consensus_error(theta: torch.Tensor, mean: torch.Tensor, spread: float) -> float:
    """max_i ||theta_i - mean|| divided by the initial spread."""
    return float(torch.linalg.vector_norm(theta - mean, dim=1).max()) / spread


def push_sum_round(theta: torch.Tensor, weight: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """One synchronous push-sum round for all nodes at once; theta in place, returns weights."""
    share = push_sum_share(theta, weight, table.shape[1])
    payload, mass = torch.zeros_like(theta), torch.zeros_like(weight)
    for slot in np.ascontiguousarray(table.T):  # every node's slot-th out-peer
        target = torch.from_numpy(slot)
        payload.index_add_(0, target, share.payload)
        mass.index_add_(0, target, share.weight)
    return push_sum_receive(theta, share.weight, payload, mass)


def rounds_to_epsilon(
    topology: str,
    world: int,
    eps: float,
    *,
    seed: int = 0,
    dim: int = 8,
    k: int | None = None,
    max_rounds: int = 1_000_000,
) -> int | None:
    """Push-sum rounds until the consensus error is below eps; None if not within max_rounds."""
    theta = initial_state(world, dim, seed)
    weight = torch.ones(world, 1, dtype=torch.float64)
    mean = theta.mean(dim=0)
    spread = float(torch.linalg.vector_norm(theta - mean, dim=1).max())
    if spread == 0:
        return 0
    for round_ in range(max_rounds + 1):
        if consensus_error(theta, mean, spread) < eps:
            return round_
        if round_ < max_rounds:
            table = peer_table(topology, world, round_, k=k, seed=seed)
            weight = push_sum_round(theta, weight, table)
    return None


def _period(topology: str, world: int) -> int:
    """Rounds whose mixing matrices are multiplied before taking eigenvalues."""
    return exponential_period(world) if topology in ("exponential", "random_regular") else 1


def spectral_prediction(
    topology: str, world: int, eps: float, *, seed: int = 0, k: int | None = None
) -> tuple[float, int]:
    """(per-round |lambda2|, predicted rounds) from the mixing matrices of the first period.

    Static graphs: rounds = ln(1/eps) / ln(1/|lambda2|) (about ln(1/eps) / (1 - |lambda2|)).
    Time-varying graphs: the same on the product of one period's matrices, times the period.
    """
    period = _period(topology, world)
    product = np.eye(world)
    for round_ in range(period):
        product = mixing_matrix(topology, world, round_, k=k, seed=seed) @ product
    moduli = np.sort(np.abs(np.linalg.eigvals(product)))[::-1]
    lam = float(moduli[1]) if world > 1 else 0.0
    if lam < 1e-9:
        return 0.0, period
    return lam ** (1 / period), period * math.ceil(math.log(1 / eps) / math.log(1 / lam))


def run_one(topology: str, world: int, args: argparse.Namespace) -> Row:
    """Simulate and predict one (topology, N) cell."""
    start = time.perf_counter()
    rounds = rounds_to_epsilon(
        topology, world, args.eps, seed=args.seed, dim=args.dim, max_rounds=args.max_rounds
    )
    seconds = time.perf_counter() - start
    lam, predicted = None, None
    if world <= args.eig_max:
        lam, predicted = spectral_prediction(topology, world, args.eps, seed=args.seed)
    degree = peer_table(topology, world, 0, seed=args.seed).shape[1]
    return Row(topology, world, degree, rounds, predicted, lam, seconds)


def _fmt(value: float | int | None, pattern: str = "{}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.2f}"


def rounds_table(rows: Sequence[Row], eps: float, max_rounds: int) -> list[str]:
    """Markdown lines for rounds to eps, prediction, and traffic per node until eps."""
    mlp = MODEL_PARAMS["cartpole_mlp"] * FLOAT32_BYTES
    lines = [
        f"## Rounds until consensus error < {eps:g}",
        "",
        "| topology | N | out-degree | rounds (simulated) | rounds (spectral prediction) "
        "| per-round \\|λ2\\| | MB per node to ε, CartPole MLP | sim seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        rounds = f"> {max_rounds:,}" if row.rounds is None else f"{row.rounds:,}"
        to_eps = "n/a" if row.rounds is None else _mb(row.rounds * 2 * row.degree * mlp)
        lines.append(
            f"| {row.topology} | {row.world} | {row.degree} | {rounds} "
            f"| {_fmt(row.predicted, '{:,}')} | {_fmt(row.lambda2, '{:.6f}')} "
            f"| {to_eps} | {row.seconds:.1f} |"
        )
    return lines


def traffic_table(sizes: Sequence[int], rows: Sequence[Row]) -> list[str]:
    """Markdown lines: MB per round through each gossip node vs through a parameter server."""
    degree = {(r.topology, r.world): r.degree for r in rows}
    lines = [
        "## MB through one process per round (sent + received, float32 parameters)",
        "",
        "Gossip node: params x (out-degree + in-degree). Parameter server: params x 2N "
        "(N gradients in, N parameter copies out).",
    ]
    for model, n_params in MODEL_PARAMS.items():
        size = n_params * FLOAT32_BYTES
        lines += [
            "",
            f"**{model}** ({n_params:,} parameters, {_mb(size)} MB)",
            "",
            "| N | " + " | ".join(TOPOLOGIES) + " | parameter server |",
            "| ---: |" + " ---: |" * (len(TOPOLOGIES) + 1),
        ]
        for world in sizes:
            cells = [_mb(2 * degree[(t, world)] * size) for t in TOPOLOGIES]
            lines.append(f"| {world} | " + " | ".join(cells) + f" | {_mb(2 * world * size)} |")
    return lines


def plot(rows: Sequence[Row], path: Path) -> bool:
    """Log-log rounds vs N per topology, predictions dashed; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for index, topology in enumerate(TOPOLOGIES):
        color = f"C{index}"
        mine = [r for r in rows if r.topology == topology]
        sim = [(r.world, r.rounds) for r in mine if r.rounds is not None]
        pred = [(r.world, r.predicted) for r in mine if r.predicted is not None]
        if sim:
            ax.plot(*zip(*sim), "o-", color=color, label=f"{topology} (simulated)")
        if pred:
            ax.plot(*zip(*pred), "--", color=color, alpha=0.7, label=f"{topology} (predicted)")
    ax.set(xscale="log", yscale="log", xlabel="nodes N", ylabel="push-sum rounds to ε")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


SCENARIOS = {
    "no faults": FaultModel(),
    "30% dropped": FaultModel(drop=0.3),
    "30% dropped, duplicated or delayed": FaultModel(drop=0.1, duplicate=0.1, delay=0.1),
    "all faults": FaultModel(
        drop=0.1, duplicate=0.1, delay=0.1,
        restarts=(Restart(300, 5, resume=True), Restart(900, 5, resume=False)),
        partition=(400, 700, frozenset(range(8))),
    ),
    "a sink (gossip.params = false)": FaultModel(sinks=frozenset({3})),
}  # fmt: skip
RULES = {"push_sum": "push-sum, link totals", "pairwise": "pairwise (no weight)"}


def fault_study(world: int = 16, rounds: int = 2000, seed: int = 0) -> list[dict]:
    """Rounds to a 1e-3 spread (after the last fault), spread, distance from the mean, weight."""
    initial = initial_state(world, 8, seed).float() + 3.0
    mean = initial.mean(dim=0)
    out = []
    for (name, faults), rule in itertools.product(SCENARIOS.items(), RULES):
        cfg = gossip_settings(mixing=rule)
        swarm, reached = Swarm(initial, cfg, faults, seed=seed), None
        ends = [r.round for r in faults.restarts] + [faults.partition[1] if faults.partition else 0]
        settle = max(ends)
        for _ in range(rounds):
            swarm.step()
            if reached is None and swarm.round > settle and swarm.spread() < 1e-3:
                reached = swarm.round - settle
        thetas = torch.stack([n.theta for n in swarm.nodes if n.rank not in faults.sinks])
        out.append({
            "scenario": name, "rule": RULES[rule], "rounds_to_1e-3": reached,
            "after_round": settle,
            "final_spread": swarm.spread(),
            "mean_error": float((thetas.mean(dim=0) - mean).norm() / mean.norm()),
            "held_weight": sum(swarm.weights()), "longest_gap": swarm.longest_gap(),
        })  # fmt: skip
        print(out[-1], flush=True)
    return out


def fault_table(rows: Sequence[dict]) -> list[str]:
    lines = [
        "## The node's mixing code under faults (16 nodes, exponential graph, 2,000 rounds)",
        "",
        "| scenario | rule | rounds to spread < 1e-3 (after the last fault) | final spread "
        "| final mean vs initial mean | weight held by nodes | longest rounds without a mix |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        after = f" (after round {r['after_round']})" if r["after_round"] else ""
        weight = f"{r['held_weight']:.2f} of 16" if r["rule"] == RULES["push_sum"] else "n/a"
        lines.append(
            f"| {r['scenario']} | {r['rule']} | {_fmt(r['rounds_to_1e-3'])}{after} "
            f"| {r['final_spread']:.1e} "
            f"| {r['mean_error']:.1e} | {weight} | {r['longest_gap']} |"
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=TOPOLOGIES)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--dim", type=int, default=8, help="parameters per simulated node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rounds", type=int, default=1_000_000)
    parser.add_argument("--eig-max", type=int, default=1024, help="largest N for eigenvalues")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/consensus_sim"))
    parser.add_argument("--faults", action="store_true", help="the node's code under faults")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the study and write table.md, results.json and plot.png under --out."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.faults:
        rows = fault_study(seed=args.seed)
        (args.out / "faults.md").write_text("\n".join(fault_table(rows)) + "\n")
        (args.out / "faults.json").write_text(json.dumps(rows, indent=2) + "\n")
        return []
    rows = []
    for topology in args.topologies:
        for world in args.sizes:
            rows.append(run_one(topology, world, args))
            print(rows[-1], flush=True)
    lines = rounds_table(rows, args.eps, args.max_rounds) + [""]
    lines += traffic_table(args.sizes, rows) if set(args.topologies) == set(TOPOLOGIES) else []
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {
        "settings": settings,
        "model_params": MODEL_PARAMS,
        "rows": [asdict(r) for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(rows, args.out / "plot.png")
    return rows


if __name__ == "__main__":
    main()
