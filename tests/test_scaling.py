"""The scaling study end to end at a tiny budget: runs, resumes, writes its table and plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "scaling.py"
LIMIT_S = 240


def test_scaling_study_runs_resumes_and_writes_table_and_plot(tmp_path, tiny_overrides):
    # CartPole returns are >= 8: a threshold of 1 is met at every evaluation (every 400 steps)
    sets = [*tiny_overrides, "eval.threshold=1", "train.total_steps=1600"]
    command = [sys.executable, str(SCRIPT), "--nodes", "1", "2", "--seeds", "1",
               "--modes", "gossip", "--out", str(tmp_path),
               *(a for s in sets for a in ("--set", s))]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=LIMIT_S)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["gossip-n2-s0", "one-n1-s0"]
    study = json.loads((tmp_path / "scaling.json").read_text())
    rows = {(r["mode"], r["nodes"]): r for r in study["rows"]}
    assert set(rows) == {("one", 1), ("gossip", 2)}
    for row in rows.values():
        assert row["reached"] == 1
        assert row["cpu_seconds_to_threshold"]["iqm_ci"][0] > 0
        assert 800 <= row["steps_to_threshold"]["iqm_ci"][0] < 804  # two evaluations, 400 apart
    assert rows[("one", 1)]["cpu_seconds_to_threshold"]["speedup"] == 1.0
    # the nodes' own figure (their 0.6 s of training may not overlap on a cold machine: not > 0)
    nodes = json.loads((tmp_path / "runs" / "gossip-n2-s0" / "summary.json").read_text())["nodes"]
    sent = [n["summary"]["exchange"]["gossip_sent_bytes_per_s"] for n in nodes]
    assert rows[("gossip", 2)]["sent_bytes_per_node_per_s"] == pytest.approx(sum(sent) / 2)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    table = (tmp_path / "scaling.md").read_text()
    assert "| gossip | 2 | 1/1 | 80" in table

    again = subprocess.run(command, capture_output=True, text=True, timeout=LIMIT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[scaling]" not in again.stdout  # every run had its summary: none ran again
    assert (tmp_path / "scaling.md").read_text() == table


def write_run(run_dir: Path, mode: str, nodes: list[tuple[dict, list[float]]]) -> None:
    """A finished run's files: per node its summary ({} if it left none) and evaluations."""
    for rank, (_, returns) in enumerate(nodes):
        (run_dir / f"node-{rank}").mkdir(parents=True)
        lines = [json.dumps({"step": 1000 * (i + 1), "wall_s": i, "eval_return_mean": r})
                 for i, r in enumerate(returns)]  # fmt: skip
        (run_dir / f"node-{rank}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    ranks = [{"rank": rank, "exit_code": 0 if summary else 1, "summary": summary}
             for rank, (summary, _) in enumerate(nodes)]  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps({"mode": mode, "nodes": ranks}))


def test_post_solve_stability_reads_each_nodes_own_evaluations(tmp_path, monkeypatch):
    """A node that left no summary (it failed) must not shift the others onto its metrics."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # experiments/ off the path again after
    import scaling

    solved = {"steps_to_threshold": 2000, "cpu_seconds_to_threshold": 3.0, "threshold": 475.0,
              "final_eval_return_mean": 490.0}  # fmt: skip
    write_run(tmp_path, "gossip", [({}, [0.0, 0.0, 0.0, 0.0]),
                                   (solved, [0.0, 500.0, 500.0, 480.0])])  # fmt: skip
    figures = scaling.run_figures(tmp_path, "gossip", 2)
    assert (figures["post_solve_evals"], figures["post_solve_at_threshold"]) == (2, 2)
    assert figures["final_evals"] == [490.0]


def test_a_run_cut_by_the_time_limit_is_named_under_the_table(tmp_path, monkeypatch):
    """A run the harness stopped at --limit-s has no final evaluation: the table must say so."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import scaling

    def study(interrupted):
        run_dir = tmp_path / f"cut-{interrupted}" / "one-n1-s0"
        summary = {"steps_to_threshold": 1000, "cpu_seconds_to_threshold": 2.0,
                   "threshold": 475.0, "interrupted": interrupted,
                   "final_eval_return_mean": None if interrupted else 500.0}  # fmt: skip
        write_run(run_dir, "single", [(summary, [500.0])])
        figures = [scaling.run_figures(run_dir, "one", 1)]
        return scaling.markdown(scaling.group_figures(figures, ["gossip"]))

    assert "limit" not in study(interrupted=False)
    assert "Stopped by --limit-s before the end of their budget: one-n1-s0" in study(True)
