"""Tests of the schedules, the eq. 4 loss and modulated sampling, DDIM and DPM-Solver++ (vcm.diffusion)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vcm.diffusion import (
    SAMPLERS,
    ddim_scheduler,
    ddpm_scheduler,
    dpmpp_2m_scheduler,
    make_scheduler,
    noise_from_seeds,
    regularisation_weight,
    sample_latents,
    vcm_loss,
)
from vcm.models.backbone import Backbone, build_networks, tiny_definitions
from vcm.models.vcm import VCM, modulate

GROUPS = [[("lv", 1)], [("skull", 1)]]
LATENT = (3, 4, 4, 4)
GRID = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vcm(seed: int = 0, identity: bool = False) -> VCM:
    torch.manual_seed(seed)
    model = VCM(
        spatial_dims=3,
        latent_channels=3,
        condition_groups=GROUPS,
        levels=2,
        encoder_channels=(4, 8),
        encoder_norm_num_groups=4,
        unet_channels=(8, 16),
        unet_num_res_blocks=1,
        unet_num_head_channels=8,
        unet_norm_num_groups=8,
        unet_out_channels=8,
        head_channels=8,
    )
    if not identity:
        for head in (model.head_gamma, model.head_beta):
            torch.nn.init.normal_(head.conv.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    defs = tiny_definitions(
        channels=(4, 8, 8),
        norm_num_groups=4,
        diffusion_channels=(8, 16),
        diffusion_num_head_channels=(0, 8),
        diffusion_norm_num_groups=8,
    )
    torch.manual_seed(0)
    ae, dm = build_networks(defs)
    with torch.no_grad():  # MONAI zero-initialises the output conv; make the backbone predict something
        dm.out[-1].conv.weight.normal_(std=0.05)
    return Backbone(ae, dm, definitions=defs)


@pytest.fixture(scope="module")
def conditions() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "lv": (torch.rand(2, 1, *GRID, generator=g) > 0.7).float(),
        "skull": torch.rand(2, 1, *GRID, generator=g),
    }


def test_training_schedule():
    scheduler = ddpm_scheduler()
    assert scheduler.num_train_timesteps == 1000 and scheduler.clip_sample is False
    betas = scheduler.betas.double()
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0205)
    steps = betas.sqrt().diff()  # scaled_linear_beta: linear in sqrt(beta)
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [200, 50])
def test_sampling_schedule(steps):
    scheduler = ddim_scheduler() if steps == 200 else ddim_scheduler(steps)
    assert len(scheduler.timesteps) == steps and scheduler.clip_sample is False
    assert scheduler.timesteps[0] == 999 and scheduler.timesteps[-1] == 0
    torch.testing.assert_close(scheduler.alphas_cumprod, ddpm_scheduler().alphas_cumprod)


def test_lambda_is_the_inverse_latent_size():
    assert regularisation_weight((16, 3, 20, 28, 20)) == pytest.approx(1 / (16 * 3 * 20 * 28 * 20))
    g = torch.Generator().manual_seed(0)
    eps, eps_mod, gamma, beta = (torch.randn(2, *LATENT, generator=g) for _ in range(4))
    expected = F.mse_loss(eps_mod, eps) + (gamma.abs().sum() + beta.abs().sum()) / (2 * 3 * 4 * 4 * 4)
    torch.testing.assert_close(vcm_loss(eps, eps_mod, gamma, beta), expected)
    zero = torch.zeros(2, *LATENT)
    assert vcm_loss(eps, eps, zero, zero).item() == 0.0
    l1 = (gamma.abs().sum() + beta.abs().sum()) / (2 * 3 * 4 * 4 * 4)
    torch.testing.assert_close(
        vcm_loss(eps, eps_mod, gamma, beta, 0.01), F.mse_loss(eps_mod, eps) + 0.01 * l1
    )
    torch.testing.assert_close(vcm_loss(eps, eps_mod, gamma, beta, 0.0), F.mse_loss(eps_mod, eps))


def test_relative_loss_weighs_every_sample_against_the_backbone():
    g = torch.Generator().manual_seed(0)
    eps, eps_t, gamma, beta = (torch.randn(2, *LATENT, generator=g) for _ in range(4))
    eps_t[1] = (
        eps[1] + 0.01 * eps_t[1]
    )  # sample 1: a nearly exact backbone (as at high t), 1e4 times smaller MSE
    zero = torch.zeros(2, *LATENT)
    assert vcm_loss(eps, eps_t, zero, zero, 0.0, reference=eps_t).item() == pytest.approx(1.0)  # identity
    eps_mod = modulate(eps_t, 0.1 * gamma, 0.1 * beta)
    per_sample = [F.mse_loss(eps_mod[i], eps[i]) / F.mse_loss(eps_t[i], eps[i]) for i in range(2)]
    torch.testing.assert_close(
        vcm_loss(eps, eps_mod, gamma, beta, 0.0, eps_t), torch.stack(per_sample).mean()
    )
    assert per_sample[1] > 100 * per_sample[0]  # the same modulation hurts the exact sample far more
    scale, reference = (0.1 * gamma).requires_grad_(), eps_t.clone().requires_grad_()
    vcm_loss(eps, modulate(eps_t, scale, 0.1 * beta), scale, beta, 0.0, reference).backward()
    assert scale.grad.abs().sum() > 0 and reference.grad is None  # the denominator is a constant


def test_weighted_loss_counts_the_weighted_voxels_more():
    g = torch.Generator().manual_seed(0)
    eps, eps_t = (torch.randn(2, *LATENT, generator=g) for _ in range(2))
    zero = torch.zeros(2, *LATENT)
    ones = torch.ones(2, 1, *LATENT[1:])
    for reference in (None, eps_t):  # uniform weights change nothing
        torch.testing.assert_close(
            vcm_loss(eps, eps_t, zero, zero, 0.0, reference, ones),
            vcm_loss(eps, eps_t, zero, zero, 0.0, reference),
        )
    weight = ones.clone()
    weight[:, :, 0] = 9.0  # one slab of the latent counts 9 times
    eps_mod = eps_t.clone()
    eps_mod[:, :, 0] = eps[:, :, 0]  # and the prediction is exact there
    squared = (eps_t - eps).square()
    per_sample = (squared * weight).sum((1, 2, 3, 4)) / weight.expand_as(squared).sum((1, 2, 3, 4))
    exact_there = (squared[:, :, 1:]).sum((1, 2, 3, 4)) / weight.expand_as(squared).sum((1, 2, 3, 4))
    torch.testing.assert_close(vcm_loss(eps, eps_t, zero, zero, 0.0, None, weight), per_sample.mean())
    relative = vcm_loss(eps, eps_mod, zero, zero, 0.0, eps_t, weight)
    torch.testing.assert_close(relative, (exact_there / per_sample).mean())
    # a fourth of the voxels carry 9 / 12 of the weight: fixing them removes most of the relative error
    assert relative < 0.35 < vcm_loss(eps, eps_mod, zero, zero, 0.0, eps_t)


def test_loss_falls_when_overfitting_a_tiny_batch():
    """A stand-in backbone that under-predicts the noise: VCM learns to correct it on a fixed batch."""
    model = tiny_vcm(identity=True).train()
    g = torch.Generator().manual_seed(1)
    latent, grid = (3, 2, 2, 2), (8, 8, 8)
    cond = {
        "lv": (torch.rand(2, 1, *grid, generator=g) > 0.7).float(),
        "skull": torch.rand(2, 1, *grid, generator=g),
    }
    z0, eps = torch.randn(2, *latent, generator=g), torch.randn(2, *latent, generator=g)
    t = torch.tensor([100, 400])
    z_t = ddpm_scheduler().add_noise(z0, eps, t)
    eps_t = 0.5 * eps + 0.3 * torch.randn(2, *latent, generator=g)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        gamma, beta = model(z_t, eps_t, t, cond)
        loss = vcm_loss(eps, modulate(eps_t, gamma, beta), gamma, beta)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    # the L1 term bounds how far it can fall (lambda * |gamma|_1 is the mean |gamma|); measured: 0.36 -> 0.28
    assert losses[-1] < 0.85 * losses[0], losses
    assert max(losses[-5:]) < min(losses[:3]), losses


def sample(backbone, model, conditions, seeds=(11, 12), steps=8, **kwargs):
    cov = torch.tensor([[[0.0, 0.4, 0.3, 0.6]]])
    noise = noise_from_seeds(seeds, LATENT)
    return sample_latents(
        lambda z, t: backbone.eps(z, t, cov), noise, ddim_scheduler(steps), model, conditions, **kwargs
    )


def test_cached_features_equal_per_step_encoder(backbone, conditions):
    model = tiny_vcm()
    cached = sample(backbone, model, conditions, cache_features=True)
    per_step = sample(backbone, model, conditions, cache_features=False)
    torch.testing.assert_close(cached, per_step, atol=1e-6, rtol=0)
    # the modulation matters, so the equality above is not vacuous
    plain = sample(backbone, None, conditions)
    assert (cached - plain).abs().max() > 1e-3


def test_cached_equals_per_step_with_a_keep_mask(backbone, conditions):
    model = tiny_vcm()
    keep = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cached = sample(backbone, model, conditions, keep=keep)
    per_step = sample(backbone, model, conditions, keep=keep, cache_features=False)
    torch.testing.assert_close(cached, per_step, atol=1e-6, rtol=0)


def test_sampling_is_deterministic_and_batch_independent(backbone, conditions):
    model = tiny_vcm()
    a = sample(backbone, model, conditions)
    b = sample(backbone, model, conditions)
    assert torch.equal(a, b)
    other = sample(backbone, model, conditions, seeds=(21, 22))
    assert not torch.allclose(a, other)
    # a subject's sample depends on its seed, not on the batch it was drawn in
    alone = sample(backbone, model, {k: v[1:] for k, v in conditions.items()}, seeds=(12,))
    torch.testing.assert_close(alone, a[1:], atol=1e-5, rtol=1e-5)


def test_stochastic_ddim_follows_the_generator(backbone, conditions):
    model = tiny_vcm()
    runs = [
        sample(backbone, model, conditions, eta=1.0, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_noise_from_seeds():
    noise = noise_from_seeds([3, 4], LATENT)
    assert noise.shape == (2, *LATENT)
    assert torch.equal(noise[1], torch.randn(LATENT, generator=torch.Generator().manual_seed(4)))


# --- DPM-Solver++ 2M (diffusers) and the shared loop -------------------------------------------------------


def test_dpmpp_2m_runs_on_the_training_schedule():
    """diffusers' scaled_linear is MONAI's scaled_linear_beta: the same float32 betas and alphas_cumprod."""
    dpm, ddpm = dpmpp_2m_scheduler(10), ddpm_scheduler()
    assert torch.equal(dpm.betas, ddpm.betas) and torch.equal(dpm.alphas_cumprod, ddpm.alphas_cumprod)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.prediction_type == "epsilon" and not dpm.config.thresholding
    assert dpm.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


def test_make_scheduler_names_the_samplers():
    assert SAMPLERS == ("ddim", "dpmpp_2m")
    assert len(make_scheduler("ddim", 7).timesteps) == 7 and len(make_scheduler("dpmpp_2m", 7).timesteps) == 7
    with pytest.raises(ValueError, match="unknown sampler 'euler': expected one of ddim, dpmpp_2m"):
        make_scheduler("euler", 10)


class _Counting:
    """A VCM proxy that counts the evaluations of its head."""

    def __init__(self, model: VCM) -> None:
        self.model, self.calls = model, 0

    def encode(self, *args):
        return self.model.encode(*args)

    def forward_from_features(self, *args):
        self.calls += 1
        return self.model.forward_from_features(*args)


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("steps", [3, 10])
def test_every_network_evaluation_is_one_step_and_modulated(backbone, conditions, kind, steps):
    cov = torch.tensor([[[0.0, 0.4, 0.3, 0.6]]])
    calls = []

    def eps_fn(z, t):
        calls.append(int(t[0]))
        return backbone.eps(z, t, cov)

    head = _Counting(tiny_vcm())
    scheduler = make_scheduler(kind, steps)
    z = sample_latents(eps_fn, noise_from_seeds((11, 12), LATENT), scheduler, head, conditions)
    assert z.shape == (2, *LATENT) and torch.isfinite(z).all()
    assert len(calls) == steps and head.calls == steps  # N steps: N backbone and N VCM evaluations
    assert calls == scheduler.timesteps.tolist()


@pytest.mark.parametrize("kind", SAMPLERS)
def test_modulation_is_applied_at_every_evaluation(backbone, kind):
    """VCM's (gamma, beta) enter every step: the same as a backbone that predicts the modulated noise."""

    class Constant:
        def encode(self, conditions, keep=None):
            return None

        def forward_from_features(self, z, eps, t, features):
            return torch.full_like(eps, -0.3), torch.full_like(eps, 0.2)

    cov = torch.tensor([[[0.0, 0.4, 0.3, 0.6]]])
    noise = noise_from_seeds((11, 12), LATENT)
    eps_fn = lambda z, t: backbone.eps(z, t, cov)  # noqa: E731
    with_vcm = sample_latents(eps_fn, noise, make_scheduler(kind, 6), Constant(), {})
    by_hand = sample_latents(lambda z, t: modulate(eps_fn(z, t), -0.3, 0.2), noise, make_scheduler(kind, 6))
    plain = sample_latents(eps_fn, noise, make_scheduler(kind, 6))
    torch.testing.assert_close(with_vcm, by_hand, atol=1e-6, rtol=0)
    assert (with_vcm - plain).abs().max() > 1e-2
    # cohort.control_scale: 0 is the backbone alone, 2 doubles the correction at every step
    off = sample_latents(eps_fn, noise, make_scheduler(kind, 6), Constant(), {}, control_scale=0.0)
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)
    doubled = sample_latents(eps_fn, noise, make_scheduler(kind, 6), Constant(), {}, control_scale=2.0)
    by_hand = sample_latents(lambda z, t: eps_fn(z, t) * (1 - 0.6) + 0.4, noise, make_scheduler(kind, 6))
    torch.testing.assert_close(doubled, by_hand, atol=1e-4, rtol=0)  # the same map, rounded in another order
    assert (doubled - with_vcm).abs().max() > 1e-2


@pytest.mark.parametrize(("scale", "expected"), [(1.0, [0.9, 1.7]), (0.0, [1.0, 2.0]), (2.0, [0.8, 1.4])])
def test_control_scale_multiplies_the_correction_about_the_identity(scale, expected):
    eps, gamma, beta = torch.tensor([1.0, 2.0]), torch.tensor([-0.3, -0.2]), torch.tensor([0.2, 0.1])
    torch.testing.assert_close(modulate(eps, gamma, beta, scale), torch.tensor(expected))


def test_control_scale_one_is_the_papers_formula_bit_for_bit():
    """Training and the default sampling keep eps * (1 + gamma) + beta exactly (same float rounding)."""
    g = torch.Generator().manual_seed(3)
    eps, gamma, beta = (torch.randn(4096, generator=g) for _ in range(3))
    assert torch.equal(modulate(eps, gamma, beta), eps * (1 + gamma) + beta)
    assert torch.equal(modulate(eps, gamma, beta, 1.0), eps * (1 + gamma) + beta)


def test_dpmpp_2m_scheduler_serves_several_runs(backbone, conditions):
    """The multistep solver keeps a history; the loop resets it, so a scheduler can be reused."""
    model = tiny_vcm()
    noise = noise_from_seeds((11, 12), LATENT)
    cov = torch.tensor([[[0.0, 0.4, 0.3, 0.6]]])
    scheduler = dpmpp_2m_scheduler(5)
    runs = [
        sample_latents(lambda z, t: backbone.eps(z, t, cov), noise, scheduler, model, conditions)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    per_step = sample_latents(
        lambda z, t: backbone.eps(z, t, cov), noise, scheduler, model, conditions, cache_features=False
    )
    torch.testing.assert_close(per_step, runs[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="only DDIM samples stochastically"):
        sample_latents(lambda z, t: backbone.eps(z, t, cov), noise, scheduler, eta=1.0)


def test_dpmpp_2m_and_ddim_solve_the_same_ode(backbone):
    """Both integrate the probability-flow ODE of one schedule: DPM-Solver++ 2M at 20 steps lands nearer to
    DDIM-500 than DDIM at 20 steps does (second order against first)."""
    cov = torch.tensor([[[0.0, 0.4, 0.3, 0.6]]])
    noise = noise_from_seeds((11, 12), LATENT)
    eps_fn = lambda z, t: backbone.eps(z, t, cov)  # noqa: E731
    reference = sample_latents(eps_fn, noise, make_scheduler("ddim", 500))
    dpm = sample_latents(eps_fn, noise, make_scheduler("dpmpp_2m", 20))
    ddim = sample_latents(eps_fn, noise, make_scheduler("ddim", 20))
    assert (dpm - reference).abs().max() < 0.5 * (ddim - reference).abs().max()
