"""The progress line shows what a person needs at a glance, mixing stalls included."""

from __future__ import annotations

from gossipdqn.node.metrics import format_progress


def test_progress_line_flags_a_mixing_stall_only_when_there_is_one() -> None:
    record = {"step": 12_004, "env_steps_per_s": 4410.0, "return_mean": 231.4, "peers_alive": 3}
    mixing = format_progress("[node 2]", record | {"params_mixed_per_s": 2.5})
    assert mixing == (
        "[node 2]  step   12,004  4,410 st/s  return 231.4  peers 3  mixed 2.5/s"
    )
    stalled = format_progress(
        "[node 2]", record | {"params_mixed_per_s": 0.0, "mixing_stalled": True}
    )
    assert stalled.endswith("peers 3  mixed 0.0/s  mixing stalled")
    assert "stalled" not in format_progress("[single]", {"step": 5})
