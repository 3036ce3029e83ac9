"""Do 4 gossip nodes that stop at 475 stay solved? Per-node finals for several seeds and variants.

Each run is `gossipdqn local -n 4` on CartPole (the defaults), every node stopping at the
threshold (`train.stop_at_threshold=true`, 50k steps at most, and, as before issue 3, one
evaluation at the threshold is enough: `eval.consecutive=1`), plus a variant's `--set`
overrides. For every node it records the env steps to the threshold, the final 20-episode
evaluation, the periodic evaluations before it, the consensus ratio at the last record, and a
`probe` evaluation of the node's final checkpoint on `--probe` more episodes (fixed seeds, the
same for every node) that estimates how good the stopped policy really is. Variant `single`
(and `single_*`) runs one `gossipdqn train` node instead, for reference. One run at a time.
Run it from the repository root with that checkout first on the path:

    PYTHONPATH=. python experiments/gossip_stability.py --seeds 0 1 2 3 4 --variants base \
        consecutive2 --json experiments/results/gossip_stability/gossip_stability.json
    PYTHONPATH=. python experiments/gossip_stability.py --summary --json <that json>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from gossipdqn.node.checkpoint import evaluate_checkpoint

STOP = ["train.stop_at_threshold=true", "train.total_steps=50000", "eval.consecutive=1"]
"""Issue 3's protocol; a variant's own --set (after these) wins, e.g. eval.consecutive=2."""
VARIANTS: dict[str, list[str]] = {
    "single": [],  # variants named single*: one `gossipdqn train` node, the reference
    "single_eval20": ["eval.episodes=20"],
    "single_consecutive2": ["eval.consecutive=2"],
    "base": [],
    "eval20": ["eval.episodes=20"],
    "consecutive2": ["eval.consecutive=2"],
    "eval20_consecutive2": ["eval.episodes=20", "eval.consecutive=2"],
    "no_params": ["gossip.params=false"],
    "no_experience": ["gossip.experience=false"],
    "interval100": ["gossip.interval=100"],
    "lr1e-3": ["learner.lr=1e-3"],
    "pairwise": ['gossip.mixing="pairwise"'],
}
PROBE_SEED = 777_777


def probe(checkpoint: Path, episodes: int) -> list[float]:
    """Returns of the checkpoint's online net on `episodes` greedy episodes (fixed seeds)."""
    return list(evaluate_checkpoint(checkpoint, episodes, seed=PROBE_SEED)[1].returns)


def node_row(node_dir: Path, probe_episodes: int) -> dict:
    """What one node did: threshold, final, periodic evaluations, consensus, probe."""
    s = json.loads((node_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (node_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_return_mean"]) for r in records if "eval_return_mean" in r]
    ratios = [r["consensus_ratio"] for r in records if "consensus_ratio" in r]
    row = {
        "steps_to_threshold": s["steps_to_threshold"],
        "final_eval_return_mean": s["final_eval_return_mean"],
        "final_eval_returns": s["final_eval_returns"],
        "evals": evals,
        "consensus_ratio": ratios[-1] if ratios else None,
    }
    if probe_episodes:
        returns = probe(node_dir / "checkpoint.pt", probe_episodes)
        row["probe_mean"] = sum(returns) / len(returns)
        row["probe_frac_500"] = sum(r >= 500 for r in returns) / len(returns)
        row["probe_returns"] = returns
    return row


def run(variant: str, seed: int, n: int, probe_episodes: int) -> list[dict]:
    """One run of `variant` (n gossip nodes, or one train node for `single`); per-node rows."""
    sets = [a for s in STOP + VARIANTS[variant] for a in ("--set", s)]
    base = [sys.executable, "-m", "gossipdqn"]
    with tempfile.TemporaryDirectory() as tmp:
        if variant.startswith("single"):
            cmd, dirs = base + ["train"], [Path(tmp)]
        else:
            cmd, dirs = base + ["local", "-n", str(n)], [Path(tmp) / f"node-{r}" for r in range(n)]
        subprocess.run(cmd + ["--quiet", "--seed", str(seed), "--run-dir", tmp, *sets], check=True)
        return [node_row(d, probe_episodes) for d in dirs]


def summarize(entry: dict, threshold: float = 475.0) -> dict:
    """Across seeds: runs with every final >= threshold, nodes below it, steps, probe."""
    runs = list(entry["seeds"].values())
    rows = [r for rows in runs for r in rows]
    steps = sorted(r["steps_to_threshold"] or 50_000 for r in rows)
    return {
        "runs": len(runs),
        "runs_all_final_ok": sum(
            all(r["final_eval_return_mean"] >= threshold for r in rs) for rs in runs
        ),
        "nodes": len(rows),
        "nodes_final_below": sum(r["final_eval_return_mean"] < threshold for r in rows),
        "min_final": min(r["final_eval_return_mean"] for r in rows),
        "median_steps_to_threshold": steps[len(steps) // 2],
        "mean_probe": sum(r.get("probe_mean", 0.0) for r in rows) / len(rows),
    }


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--probe", type=int, default=100, help="episodes; 0 skips the probe")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--summary", action="store_true", help="only summarize --json")
    args = parser.parse_args()
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.summary:
        for variant, entry in result.items():
            print(variant, json.dumps(summarize(entry)))
        return
    for variant in args.variants:
        for seed in args.seeds:
            rows = run(variant, seed, args.n, args.probe)
            entry = result.setdefault(variant, {"sets": VARIANTS[variant], "seeds": {}})
            entry["seeds"][str(seed)] = rows
            entry["summary"] = summarize(entry)
            finals = [r["final_eval_return_mean"] for r in rows]
            steps = [r["steps_to_threshold"] for r in rows]
            probes = [round(r.get("probe_mean", 0), 1) for r in rows]
            print(f"{variant} seed {seed}: finals {finals} steps {steps} probe {probes}")
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")  # after every run


if __name__ == "__main__":
    main()
