"""Q-networks for each observation kind, and the learner's throughput options on CPU."""

import math

import numpy as np
import pytest
import torch

from gossipdqn.config import LearnerConfig, NetworkConfig
from gossipdqn.dqn.learner import Learner, Prefetcher
from gossipdqn.dqn.networks import build_q_network, fingerprint, flat_parameters_, network_kind
from gossipdqn.dqn.replay import ReplayBuffer
from gossipdqn.types import EnvSpec, Transitions

ATARI = EnvSpec((4, 84, 84), np.dtype(np.uint8), 6)
MINATAR = EnvSpec((10, 10, 4), np.dtype(bool), 3)
VECTOR = EnvSpec((4,), np.dtype(np.float32), 2)


@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize(
    "spec, kind", [(ATARI, "nature_cnn"), (MINATAR, "minatar_cnn"), (VECTOR, "mlp")]
)
def test_auto_picks_the_network_and_it_maps_obs_to_q(spec, kind, dueling):
    assert network_kind(spec, "auto") == kind
    net = build_q_network(spec, NetworkConfig(dueling=dueling))
    obs = torch.from_numpy(np.ones((5, *spec.obs_shape), dtype=spec.obs_dtype))
    assert net(obs).shape == (5, spec.n_actions)
    assert (net.value is not None) == dueling


def test_nature_cnn_has_the_published_shape():
    net = build_q_network(ATARI, NetworkConfig(kind="nature_cnn"))
    linear = [m for m in net.body.modules() if isinstance(m, torch.nn.Linear)]
    assert linear[0].in_features == 64 * 7 * 7 and linear[0].out_features == 512
    frames = torch.full((1, *ATARI.obs_shape), 255, dtype=torch.uint8)
    assert torch.allclose(net.body[0](frames), torch.ones(1, *ATARI.obs_shape))


def test_cnn_on_vectors_is_refused_and_fingerprints_differ():
    with pytest.raises(ValueError, match="network.kind"):
        build_q_network(VECTOR, NetworkConfig(kind="nature_cnn"))
    a = fingerprint(build_q_network(MINATAR, NetworkConfig(kind="minatar_cnn")))
    assert a != fingerprint(build_q_network(MINATAR, NetworkConfig(kind="mlp")))


def test_flat_parameters_are_views_of_one_vector_that_training_updates():
    net = build_q_network(MINATAR, NetworkConfig(kind="minatar_cnn", dueling=True))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = flat_parameters_(net)
    assert flat.numel() == sum(p.numel() for p in net.parameters()) and flat.is_contiguous()
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])  # same values, now stored in `flat`
    flat.zero_()
    assert all(p.abs().sum() == 0 for p in net.parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(2, *MINATAR.obs_shape)).sum().backward()
    optimizer.step()
    assert flat.abs().sum() > 0  # the optimizer wrote into the flat vector
    net.load_state_dict(before)
    assert torch.equal(flat, torch.cat([v.reshape(-1) for v in before.values()]))


def test_learner_online_net_lives_in_its_flat_vector():
    learner = Learner(VECTOR, NetworkConfig(), LearnerConfig(), seed=0)
    learner.online_flat.fill_(0.25)
    assert all(torch.all(p == 0.25) for p in learner.online.parameters())
    assert not any(torch.all(p == 0.25) for p in learner.target.parameters())


def filled_replay(spec, n=256):
    rng = np.random.default_rng(0)
    replay = ReplayBuffer(n, spec.obs_shape, spec.obs_dtype)
    obs = rng.integers(0, 2, (n, *spec.obs_shape)).astype(spec.obs_dtype)
    replay.add(Transitions(obs, rng.integers(0, spec.n_actions, n), rng.random(n, np.float32),
                           obs[::-1].copy(), np.full(n, 0.9, np.float32)))  # fmt: skip
    return replay


def updates(spec, cfg, steps=6):
    learner = Learner(spec, NetworkConfig(), cfg, seed=0)
    replay = filled_replay(spec)
    batches = [replay.sample(32) for _ in range(steps)]
    return learner, [learner.step(b) for b in batches]


def test_bf16_autocast_stays_close_to_float32():
    _, full = updates(MINATAR, LearnerConfig(device="cpu"))
    _, half = updates(MINATAR, LearnerConfig(device="cpu", bf16=True))
    assert [r.loss for r in half] == pytest.approx([r.loss for r in full], rel=0.1, abs=1e-3)


def test_metrics_sync_every_n_updates_reports_the_mean():
    _, every = updates(VECTOR, LearnerConfig(device="cpu"))
    _, third = updates(VECTOR, LearnerConfig(device="cpu", metrics_every=3))
    assert math.isnan(third[0].loss) and math.isnan(third[1].loss)
    assert third[2].loss == pytest.approx(np.mean([r.loss for r in every[:3]]), rel=1e-5)
    assert third[5].mean_q == pytest.approx(np.mean([r.mean_q for r in every[3:]]), rel=1e-5)


@pytest.mark.timeout(120)
def test_compiled_loss_equals_eager():
    pytest.importorskip("torch._inductor")
    _, eager = updates(VECTOR, LearnerConfig(device="cpu"), steps=3)
    _, compiled = updates(VECTOR, LearnerConfig(device="cpu", compile=True), steps=3)
    assert [r.loss for r in compiled] == pytest.approx([r.loss for r in eager], rel=1e-4)


def test_prefetcher_hands_over_device_batches_and_errors():
    learner = Learner(VECTOR, NetworkConfig(), LearnerConfig(device="cpu"), seed=0)
    replay = filled_replay(VECTOR)
    prefetch = Prefetcher(lambda: replay.sample(32), learner)
    try:
        batch = prefetch.next()
        assert isinstance(batch.obs, torch.Tensor) and isinstance(batch.indices, np.ndarray)
        assert np.isfinite(learner.step(batch).loss)
    finally:
        prefetch.close()
    failing = Prefetcher(lambda: ReplayBuffer(4, (4,), np.float32).sample(2), learner)
    try:
        with pytest.raises(ValueError, match="empty"):
            failing.next()
    finally:
        failing.close()
    assert not prefetch.thread.is_alive() and not failing.thread.is_alive()
