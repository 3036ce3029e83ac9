"""The report: IQM and bootstrap against computed answers; plots and table from a real run."""

import json

import numpy as np
import pytest

from gossipdqn.cli import main
from gossipdqn.report import (
    ReportError,
    bootstrap_ci,
    find_run_dirs,
    iqm,
    load_run,
    traffic,
    write_report,
)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [([4, 1, 3, 2], 2.5), ([5, 1, 3, 100, 2], 10 / 3), ([7], 7.0), (list(range(8)), 3.5)],
)
def test_iqm_is_the_mean_of_the_middle_half(scores, expected):
    assert iqm(np.array(scores, dtype=float)) == pytest.approx(expected)


def test_iqm_along_an_axis_matches_each_column():
    scores = np.array([[1.0, 10.0], [2.0, 40.0], [3.0, 20.0], [4.0, 30.0]])
    np.testing.assert_allclose(iqm(scores, axis=0), [2.5, 25.0])


def test_bootstrap_ci_brackets_the_iqm_and_collapses_on_constant_runs():
    scores = np.array([[100.0, 5.0], [200.0, 5.0], [300.0, 5.0], [400.0, 5.0], [500.0, 5.0]])
    low, high = bootstrap_ci(scores)
    assert low[0] < iqm(scores[:, 0]) < high[0]
    assert low[0] >= 100.0 and high[0] <= 500.0
    assert low[1] == high[1] == 5.0


def fake_run(path, mode, exchange, server=None):
    """A combined summary of one node (with `exchange` metrics) and two eval records."""
    node = path / "node-0"
    node.mkdir(parents=True)
    records = [{"step": 100, "wall_s": 1.0, "eval_return_mean": 10.0},
               {"step": 200, "wall_s": 2.0, "eval_return_mean": 30.0}]  # fmt: skip
    (node / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    node_summary = {"exchange": exchange, "final_eval_return_mean": 30.0}
    summary = {"mode": mode, "nodes": [{"rank": 0, "exit_code": 0, "summary": node_summary}]}
    if server:
        summary["server"] = server
    (path / "summary.json").write_text(json.dumps(summary))
    (node / "summary.json").write_text(json.dumps(node_summary))


def test_busiest_process_is_the_server_when_there_is_one(tmp_path):
    exchange = {"sent_bytes_per_s": 100.0, "recv_bytes_per_s": 20.0}
    fake_run(tmp_path / "ps", "ps", exchange, {"bytes_in_per_s": 300.0, "bytes_out_per_s": 50.0})
    fake_run(tmp_path / "gossip", "gossip", {"gossip_sent_bytes_per_s": 7.0,
                                             "gossip_recv_bytes_per_s": 3.0})  # fmt: skip
    assert traffic(load_run(tmp_path / "ps")) == (100.0, 350.0)
    assert traffic(load_run(tmp_path / "gossip")) == (7.0, 10.0)
    assert find_run_dirs([tmp_path]) == [tmp_path / "gossip", tmp_path / "ps"]


def test_report_on_a_tiny_finished_run(tmp_path, tiny_overrides, capsys):
    sets = [a for s in tiny_overrides for a in ("--set", s)]
    run_dir, out = tmp_path / "single", tmp_path / "report"
    assert main(["baseline", "single", "--run-dir", str(run_dir), "--quiet", *sets]) == 0
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "returns.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| single"))
    final = json.loads((run_dir / "summary.json").read_text())["final_eval_return_mean"]
    assert row.split(" | ")[1:3] == ["1", "1"]
    assert f"{final:.0f} [{final:.0f}, {final:.0f}]" in row
    assert str(out / "table.md") in capsys.readouterr().out


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no run dirs"):
        write_report([tmp_path], tmp_path / "out")
    assert main(["report", str(tmp_path)]) == 2
