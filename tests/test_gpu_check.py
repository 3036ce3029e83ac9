"""experiments/gpu_check.py at its tiny size on CPU: every figure runs and prints its JSON line."""

import json
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
pytest.importorskip("ale_py", reason="the Pong and Nature-CNN figures need ale-py")
pytest.importorskip("minatar", reason="the gossip figure runs MinAtar Breakout")


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # the script imports bench_throughput
    import gpu_check

    return gpu_check


def test_a_device_torch_cannot_give_is_refused_before_anything_runs(gpu_check, capsys):
    devices = ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--device", device, "--tiny"])
        assert exit_info.value.code == 2
        assert "--device:" in capsys.readouterr().err


def test_tiny_run_prints_its_figures(gpu_check, capsys, tmp_path):
    # the in-process figures; pong and gossip start six processes (over a minute of CPU here),
    # and what they measure is bench_throughput's and `gossipdqn local`'s, tested on their own
    out = tmp_path / "lines.jsonl"
    figures = ["--figures", "cartpole", "cnn"]
    code = gpu_check.main(["--device", "cpu", "--tiny", *figures, "--out", str(out)])
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert code == 0, [r for r in printed if "error" in r]
    assert [json.loads(x) for x in out.read_text().splitlines()] == printed
    rows: dict[str, list[dict]] = {}
    for row in printed:
        rows.setdefault(row.pop("figure"), []).append(row)
    assert rows["machine"] == [rows["machine"][0] | {"device": "cpu", "gpu": None, "tiny": True}]
    (train,) = rows["cartpole_train"]
    assert train["exit_code"] == 0 and train["reached"] and train["threshold"] == 1.0
    assert [r["batch"] for r in rows["nature_cnn_updates"]] == list(gpu_check.TINY.batches)
    for r in rows["nature_cnn_updates"]:
        top, bottom = r["learner_updates_per_s"], r["bare_updates_per_s"]
        assert top > 0 and bottom > 0 and r["ratio"] == pytest.approx(top / bottom)
    assert set(rows) == {"machine", "cartpole_train", "nature_cnn_updates"}
