"""The moving average of the control module's weights (``training.ema_decay``, :mod:`vcm.training.ema`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures import make_encoded, two_branch_config
from vcm.training.checkpoints import CHECKPOINT_DIR, FINAL
from vcm.training.ema import ema_decay_at, ema_update
from vcm.training.loop import train
from vcm.training.run import set_up


@pytest.mark.parametrize("decay, expected", [(0.0, 3.0), (1.0, 1.0), (0.75, 1.5)])
def test_ema_update_moves_by_one_minus_decay(decay, expected):
    ema, model = nn.Linear(1, 1), nn.Linear(1, 1)
    nn.init.constant_(ema.weight, 1.0), nn.init.constant_(model.weight, 3.0)
    ema_update(ema, model, decay)
    assert float(ema.weight.detach()) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.1), (8, 0.5), (10_000, 0.99)])
def test_the_decay_is_lower_over_the_first_steps(step, expected):
    assert ema_decay_at(step, 0.99) == pytest.approx(expected)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    files = make_encoded(root)
    # ema_decay None in the config: the runs without the override train and return the last step's weights
    cfg = two_branch_config(
        batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=2, seed=0, prior_reuse=1, ema_decay=None
    )

    def run(out: str, **kwargs):
        args = (cfg, files["dataset"], files["latents"], files["bundle"], "two", 2, root / out)
        return train(*args, progress=False, **kwargs)

    return cfg, files, root, run


def _weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)[key]


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in state.items()}


@pytest.mark.usefixtures("one_thread")
def test_vcm_pt_holds_the_average_of_the_steps_weights(setup):
    cfg, files, root, run = setup
    initial = set_up(
        cfg, (files["dataset"], files["latents"], files["bundle"]), "two", 2, root / "init", None, {}
    ).model.state_dict()
    steps = [run(f"raw{n}", steps=3, stop_after=n).model.state_dict() for n in (1, 2)]
    steps.append(run("raw3", steps=3).model.state_dict())
    # compared on the CPU, where vcm.pt loads: on a GPU machine the runs train there
    initial, steps = _on_cpu(initial), [_on_cpu(s) for s in steps]
    run("ema", steps=3, ema_decay=0.999)
    shipped, last = _weights(root / "ema" / "vcm.pt"), _weights(root / "ema" / CHECKPOINT_DIR / FINAL)
    for key, value in initial.items():
        expected = value.double()
        for step, weights in enumerate(steps):  # decays 0.1, 2/11, 0.25 over the first three steps
            expected = torch.lerp(expected, weights[key].double(), 1 - ema_decay_at(step, 0.999))
        torch.testing.assert_close(shipped[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(last[key], steps[-1][key]), key  # the checkpoint keeps the last step's weights
    assert any(not torch.equal(shipped[k], steps[-1][k]) for k in shipped)


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_averages_as_an_uninterrupted_one(setup):
    *_, root, run = setup
    run("whole", steps=4, ema_decay=0.9)
    run("resumed", steps=4, ema_decay=0.9, stop_after=2)
    assert run("resumed", steps=4, ema_decay=0.9).resumed_from == 2
    whole, resumed = _weights(root / "whole" / "vcm.pt"), _weights(root / "resumed" / "vcm.pt")
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
