import pytest
import torch

from gossipdqn.dqn.losses import td_loss, td_targets


def test_dqn_target_uses_max_of_target_net():
    rewards = torch.tensor([1.0, 0.5])
    discounts = torch.tensor([0.9, 0.0])
    next_target = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    expected = torch.tensor([1.0 + 0.9 * 3.0, 0.5 + 0.0 * 5.0])
    assert torch.allclose(td_targets(rewards, discounts, next_target), expected)


def test_double_dqn_target_evaluates_online_argmax_with_target_net():
    rewards = torch.tensor([1.0, 0.0])
    discounts = torch.tensor([0.99, 0.99**3])
    next_target = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    next_online = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    # online picks action 0 in the first row and 1 in the second; the target net values them
    expected = torch.tensor([1.0 + 0.99 * 1.0, 0.0 + 0.99**3 * 2.0])
    got = td_targets(rewards, discounts, next_target, next_online)
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("kind", ["huber", "mse"])
def test_td_loss_weights_and_errors(kind):
    q = torch.tensor([0.0, 0.0, 0.0])
    targets = torch.tensor([0.5, 2.0, -3.0])
    weights = torch.tensor([1.0, 0.5, 0.0])
    loss, errors = td_loss(q, targets, weights, kind)
    assert torch.equal(errors, targets)
    if kind == "huber":
        per = torch.tensor([0.5 * 0.25, 2.0 - 0.5, 3.0 - 0.5])
    else:
        per = 0.5 * targets**2
    assert loss.item() == pytest.approx((weights * per).mean().item())
