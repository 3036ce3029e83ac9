"""TD targets and losses of DQN and Double DQN."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def td_targets(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """r + discount * Q_target(s', a'), a' = argmax of Q_online (Double DQN) or of Q_target."""
    chooser = next_q_target if next_q_online is None else next_q_online
    best = chooser.argmax(dim=1, keepdim=True)
    return rewards + discounts * next_q_target.gather(1, best).squeeze(1)


def td_loss(
    q_taken: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted Huber or squared TD loss, and the TD errors."""
    errors = targets - q_taken
    if kind == "huber":
        per_sample = F.huber_loss(q_taken, targets, reduction="none", delta=1.0)
    else:
        per_sample = 0.5 * errors.pow(2)
    return (weights * per_sample).mean(), errors
