"""The shipped demo backbone (resources/backbone/demo) against fresh demo-generator subjects.

These tests pin the contract between the backbone's training and VCM's: the U-Net must see latents drawn the
way it was trained on (the tiny backbone: posterior means), or every VCM trained on it learns to undo noise
the backbone never saw (found when the demo's controlled previews matched the uncontrolled ones, with an earlier
bundle whose posterior was wide), and they check that the shipped weights are the ones documented."""

from __future__ import annotations

import h5py
import pytest
import torch

from tests.fixtures import REPO
from vcm.diffusion import ddpm_scheduler
from vcm.grid import Grid
from vcm.models.backbone import load_bundle
from vcm.prep.demo import build_corpus

BUNDLE = REPO / "resources" / "backbone" / "demo"
SCALE_FACTOR = 1.0596769  # 1 / std of the training latents (training_record.json)
MSE_MEAN = 0.0202  # measured with this test's subjects, noise and time steps (the 2026-12-05 bundle)


@pytest.fixture(scope="module")
def shipped_and_posterior(tmp_path_factory, one_thread):
    """The shipped backbone and the posterior of three unseen demo-generator subjects (seed 123)."""
    path = build_corpus(tmp_path_factory.mktemp("corpus") / "c.h5", 3, Grid.from_config("demo"), seed=123)
    with h5py.File(path, "r") as h5:
        x = torch.from_numpy(h5["image"][:].astype("float32"))
        cov = torch.from_numpy(h5["covariates"][:].astype("float32")).unsqueeze(1)
    backbone = load_bundle(BUNDLE)
    with torch.no_grad():
        mu, sigma = backbone.encode(x)
    return backbone, mu, sigma, cov


def _eps_mse(backbone, z0, cov, seed=0):
    """Mean noise-prediction MSE over t in [300, 1000) (eight fixed steps), fixed noise."""
    alphas = ddpm_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    errors = []
    for t in range(300, 1000, 90):
        noise = torch.randn(z0.shape, generator=g)
        a = alphas[t]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            eps = backbone.eps(z_t, torch.full((z0.shape[0],), t), cov)
        errors.append(torch.mean((eps - noise) ** 2).item())
    return sum(errors) / len(errors)


def test_shipped_bundle_declares_posterior_means(shipped_and_posterior):
    backbone = shipped_and_posterior[0]
    assert backbone.latent_sampling == "mean"
    assert backbone.posterior_weight == 0.0
    assert backbone.scale_factor == pytest.approx(SCALE_FACTOR, rel=1e-6)
    assert backbone.latent_channels == 8 and backbone.downsample_factor == 4


def test_shipped_backbone_predicts_noise_on_the_latents_it_was_trained_on(shipped_and_posterior):
    backbone, mu, sigma, cov = shipped_and_posterior
    z_mean = backbone.sample_latent(mu, sigma, torch.Generator().manual_seed(1))
    assert torch.equal(z_mean, mu * backbone.scale_factor)
    mse_mean = _eps_mse(backbone, z_mean, cov)
    z_sampled = (mu + sigma * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))) * (
        backbone.scale_factor
    )
    mse_sampled = _eps_mse(backbone, z_sampled, cov)
    # measured: MSE_MEAN on posterior means (the training's held-out level); the KL weight 1e-8 keeps the
    # posterior narrow, so samples of it are almost the means (the earlier, wide-posterior bundle: ~10x worse)
    assert mse_mean < 1.5 * MSE_MEAN
    assert mse_sampled < 1.5 * MSE_MEAN
    assert float(sigma.mean()) < 0.1 * float(mu.std())


def test_shipped_backbone_latents_have_unit_scale(shipped_and_posterior):
    backbone, mu, _, _ = shipped_and_posterior
    assert 0.7 < float((mu * backbone.scale_factor).std()) < 1.3
