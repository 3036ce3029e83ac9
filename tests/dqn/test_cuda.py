"""The learner's CUDA path: skipped on a machine without CUDA, run on a GPU machine (the CPU
branch of the same code cannot show these defects)."""

import pytest
import torch
from test_learner import tiny_node

from gossipdqn.dqn.learner import pick_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_without_an_index_is_the_device_its_tensors_land_on():
    assert pick_device("cuda") == torch.zeros(1, device="cuda").device
    assert pick_device("auto") == torch.zeros(1, device="cuda").device


@pytest.mark.parametrize("settings", [
    ("learner.prefetch=true",),
    ("learner.prefetch=true", "learner.bf16=true"),
    ("learner.prefetch=false", "learner.bf16=true", "learner.compile=true"),
    ("env.id=\"MinAtar/Breakout-v1\"", "learner.prefetch=true"),
], ids=["prefetch", "prefetch-bf16", "compile-bf16", "minatar-prefetch"])  # fmt: skip
def test_a_node_on_cuda_trains_with_its_learner_options(tmp_path, settings):
    node = tiny_node(tmp_path, 'learner.device="cuda"', *settings)
    try:
        while node.progress.updates < 20:
            node.train_step()
        assert node.learner.online_flat.device.type == "cuda"
        assert torch.isfinite(node.learner.online_flat).all()
    finally:
        node.close()
