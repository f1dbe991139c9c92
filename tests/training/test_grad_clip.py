"""Gradient-norm clipping of the control module's training (``training.grad_clip_norm``)."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import make_encoded, two_branch_config
from vcm.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(steps, clip) -> (state dict, history)`` of a tiny VCM trained that many steps at that clipping norm."""
    root = tmp_path_factory.mktemp("clip")
    files = make_encoded(root)
    cfg = two_branch_config(batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=10, seed=0, prior_reuse=1)

    def run(steps: int, clip: float | None) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
        out = root / f"s{steps}_c{clip}"
        args = (cfg, files["dataset"], files["latents"], files["bundle"], "two", 2, out)
        result = train(*args, progress=False, write_model=False, steps=steps, grad_clip_norm=clip)
        return {k: v.clone() for k, v in result.model.state_dict().items()}, result.history

    return run


def _largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_norm_above_the_gradients_changes_nothing(trained):
    (a, history), (b, _) = trained(2, None), trained(2, 1.0e6)
    assert _largest_change(a, b) == 0.0
    assert len(history["grad_norm"]) == 2 and all(0 < g < 1.0e6 for g in history["grad_norm"])


def test_a_tiny_norm_all_but_stops_the_updates(trained):
    # AdamW's step is about lr whatever the gradient's scale, unless the gradient is far below its eps (1e-8)
    assert _largest_change(trained(1, None)[0], trained(2, None)[0]) > 1e-4
    assert _largest_change(trained(1, 1e-12)[0], trained(2, 1e-12)[0]) < 1e-5
    # the history logs the norm before clipping: the first step's gradient is the unclipped run's
    assert trained(1, 1e-12)[1]["grad_norm"] == pytest.approx(trained(1, None)[1]["grad_norm"], rel=1e-6)
