"""The prior bank: the frozen backbone's predictions computed once and reused over steps (vcm.training.prior_bank)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.fixtures import make_encoded, two_branch_config
from vcm.diffusion import ddpm_scheduler
from vcm.models.backbone import load_bundle
from vcm.training.batches import TrainData, add_noise, draw_batch
from vcm.training.loop import train
from vcm.training.prior_bank import PriorBank, bank_entries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_encoded(tmp_path_factory.mktemp("bank"))


@pytest.fixture(scope="module")
def bank_inputs(files):
    data = TrainData(files["dataset"], files["latents"], "train_4", ["lv"])
    return data, load_bundle(files["bundle"]), ddpm_scheduler().alphas_cumprod


@pytest.mark.parametrize(
    ("steps", "batch", "draws", "reuse", "subjects", "flips", "expected"),
    [(1200, 4, 4, 4, 24, 2, 100), (10, 2, 1, 4, 4, 2, 1), (7, 3, 2, 1, 4, 1, 11)],
)
def test_bank_entries_serve_each_prediction_about_reuse_times(
    steps, batch, draws, reuse, subjects, flips, expected
):
    entries = bank_entries(steps, batch, draws, reuse, subjects, flips)
    assert entries == expected
    assert entries * subjects * flips * reuse >= steps * batch * draws


@pytest.mark.parametrize("flip", [True, False])
def test_bank_holds_the_backbones_prediction_on_each_noisy_latent(bank_inputs, flip):
    data, backbone, alphas = bank_inputs
    backbone = copy.copy(backbone)
    backbone.latent_sampling = "mean"  # clean latents are the posterior means: z0 is known exactly
    bank = PriorBank.build(data, backbone, alphas, entries=3, flip=flip, seed=0, chunk=5, progress=False)
    rows = len(data) * (2 if flip else 1)
    assert bank.z_t.shape == bank.noise.shape == bank.eps.shape == (rows, 3, *data.latent_shape)
    assert bank.t.shape == (rows, 3) and bank.entries == 3
    # row subject*2 + 1 is the flipped view: its noisy latent is built from the flipped posterior
    row, subject, view = (3, 1, 1) if flip else (1, 1, 0)
    z0 = data.mu[subject, view] * backbone.scale_factor
    expected = add_noise(z0.expand(3, *z0.shape), bank.noise[row], bank.t[row], alphas)
    torch.testing.assert_close(bank.z_t[row], expected)
    cov = data.cov[subject].expand(3, 1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            bank.eps[row], backbone.eps(bank.z_t[row], bank.t[row], cov), atol=1e-5, rtol=0
        )
    again = PriorBank.build(data, backbone, alphas, entries=3, flip=flip, seed=0, chunk=2, progress=False)
    torch.testing.assert_close(
        again.eps, bank.eps, atol=1e-5, rtol=0
    )  # chunking does not change a prediction
    assert torch.equal(again.t, bank.t) and torch.equal(again.noise, bank.noise)
    other = PriorBank.build(data, backbone, alphas, entries=3, flip=flip, seed=1, chunk=5, progress=False)
    assert not torch.equal(other.noise, bank.noise)


def test_a_batch_from_the_bank_takes_its_subjects_flips_and_entries(bank_inputs):
    data, backbone, alphas = bank_inputs
    bank = PriorBank.build(data, backbone, alphas, entries=4, flip=True, seed=0, progress=False)
    g = torch.Generator().manual_seed(7)
    batch = draw_batch(data, 4, g, alphas, backbone.scale_factor, True, draws=2, bank=bank)
    assert batch.z_t.shape == batch.eps_t.shape == (8, *data.latent_shape) and batch.cov.shape == (8, 1, 4)
    assert batch.flip.any() and not batch.flip.all()  # seed 7 flips some: both rows of the bank are used
    # every latent row is one of its subject's bank entries under its flip, with that entry's t and prediction
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(len(data), generator=g)
    for i in range(4):
        row = int(idx[i]) * 2 + int(batch.flip[i])
        for j in range(2):
            r = 2 * i + j
            match = (bank.z_t[row] == batch.z_t[r]).flatten(1).all(1)
            assert match.sum() == 1
            k = int(match.nonzero())
            assert batch.t[r] == bank.t[row, k] and torch.equal(batch.eps_t[r], bank.eps[row, k])
            assert torch.equal(batch.noise[r], bank.noise[row, k])
        torch.testing.assert_close(batch.cov[2 * i], data.cov[idx[i]].unsqueeze(0))


def test_training_with_a_prior_bank_is_reproducible_and_differs_from_fresh_noise(tmp_path, files):
    cfg = two_branch_config(
        steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, seed=0, noise_draws=2, prior_reuse=2
    )

    def run(out, **kwargs):
        return train(
            cfg,
            files["dataset"],
            files["latents"],
            files["bundle"],
            "two",
            2,
            tmp_path / out,
            progress=False,
            **kwargs,
        )

    a, b = run("a"), run("b")
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    # a resumed run rebuilds the same bank and ends where an uninterrupted one does
    run("c", stop_after=2)
    c = run("c")
    assert c.resumed_from == 2
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, c.model.state_dict()[key]), key
    fresh = run("fresh", prior_reuse=1)
    assert any(not torch.equal(v, fresh.model.state_dict()[k]) for k, v in a.model.state_dict().items())
