"""The consensus study's batched push-sum agrees with a node-by-node loop and known spectra."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gossipdqn.gossip.mixing import push_sum_receive_many, push_sum_share
from gossipdqn.gossip.topology import out_peers

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "consensus_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("consensus_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["consensus_sim"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules["consensus_sim"]


def _direct_rounds(topology: str, world: int, eps: float, initial: torch.Tensor) -> int:
    """Rounds to eps with one 1-D tensor per node and messages delivered one at a time."""
    thetas = [row.clone() for row in initial]
    weights = [1.0] * world
    mean = initial.mean(dim=0)
    spread = max(float(torch.linalg.vector_norm(t - mean)) for t in thetas)
    for round_ in range(10_000):
        if max(float(torch.linalg.vector_norm(t - mean)) for t in thetas) / spread < eps:
            return round_
        inbox: list[list] = [[] for _ in range(world)]
        for rank in range(world):
            peers = out_peers(topology, rank, world, round_)
            share = push_sum_share(thetas[rank], weights[rank], len(peers))
            weights[rank] = share.weight
            for peer in peers:
                inbox[peer].append((share.payload, share.weight))
        for rank in range(world):
            weights[rank] = push_sum_receive_many(thetas[rank], weights[rank], inbox[rank])
    raise AssertionError("direct loop did not converge")


@pytest.mark.parametrize("topology", ["ring", "exponential", "random_regular", "complete"])
@pytest.mark.parametrize("eps", [1e-3, 1e-6])
def test_rounds_to_epsilon_matches_direct_loop(sim, topology: str, eps: float) -> None:
    world, dim = 8, 8
    expected = _direct_rounds(topology, world, eps, sim.initial_state(world, dim, seed=0))
    assert sim.rounds_to_epsilon(topology, world, eps, seed=0, dim=dim) == expected


def test_rounds_to_epsilon_gives_up(sim) -> None:
    assert sim.rounds_to_epsilon("ring", 8, 1e-3, max_rounds=5) is None


@pytest.mark.parametrize("world", [8, 16, 32])
def test_spectral_prediction_known_spectra(sim, world: int) -> None:
    lam, _ = sim.spectral_prediction("ring", world, 1e-3)
    assert lam == pytest.approx(math.cos(math.pi / world))  # |(1 + e^(2 pi i / N)) / 2|
    assert sim.spectral_prediction("exponential", world, 1e-3) == (0.0, int(math.log2(world)))
    assert sim.spectral_prediction("complete", world, 1e-3) == (0.0, 1)


def test_main_writes_table_json_and_plot(sim, tmp_path: Path) -> None:
    rows = sim.main(["--sizes", "4", "8", "--max-rounds", "50", "--out", str(tmp_path)])
    assert len(rows) == 8
    table = (tmp_path / "table.md").read_text()
    assert "| exponential | 8 | 1 | 3 | 3 |" in table
    assert "| ring | 8 | 1 | > 50 |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model_params"]["cartpole_mlp"] == 67_586
    assert results["model_params"]["nature_cnn"] == 1_687_206
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plot.png").stat().st_size > 0
