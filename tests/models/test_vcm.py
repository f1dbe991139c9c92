"""Tests of the Volumetric Conditioning Module (vcm.models.vcm)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets.autoencoderkl import AEKLResBlock

from vcm.models.backbone import Backbone, build_networks, count_parameters, tiny_definitions
from vcm.models.vcm import (
    VCM,
    crop_to_shape,
    modulate,
    pad_to_multiple,
    sample_keep_mask,
    subset_probabilities,
)

ONE_GROUP = [[("lv", 1)]]
TWO_GROUPS = [[("lv", 1), ("brain", 1)], [("skull", 1)]]
TINY = {
    "levels": 2,
    "encoder_channels": (4, 8),
    "encoder_norm_num_groups": 4,
    "unet_channels": (8, 16, 16),
    "unet_num_res_blocks": 1,
    "unet_num_head_channels": 8,
    "unet_norm_num_groups": 8,
    "unet_out_channels": 8,
    "head_channels": 8,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vcm(groups=TWO_GROUPS, seed: int = 0, identity: bool = False) -> VCM:
    torch.manual_seed(seed)
    model = VCM(spatial_dims=3, latent_channels=3, condition_groups=groups, **TINY)
    if not identity:  # leave the identity init so that the conditions matter
        for head in (model.head_gamma, model.head_beta):
            torch.nn.init.normal_(head.conv.weight, std=0.1)
    return model.eval()


def conditions(batch: int, grid: tuple[int, ...], names=("lv", "brain", "skull"), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand((batch, 1, *grid), generator=g) > 0.5).float() for n in names}


def latents(batch: int, grid: tuple[int, ...], seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *grid), generator=g), torch.randn((batch, 3, *grid), generator=g)


@pytest.mark.parametrize("groups", [ONE_GROUP, TWO_GROUPS], ids=["1group", "2groups"])
@pytest.mark.parametrize("latent", [(4, 4, 4), (10, 14, 10)], ids=["4^3", "10x14x10"])
def test_shapes(groups, latent):
    model = tiny_vcm(groups)
    grid = tuple(4 * s for s in latent)
    z_t, eps_t = latents(2, latent)
    with torch.no_grad():
        features = model.encode(conditions(2, grid))
        gamma, beta = model(z_t, eps_t, torch.tensor([0, 999]), conditions(2, grid))
    assert features.shape == (2, 8, *latent)
    assert gamma.shape == beta.shape == z_t.shape


@pytest.mark.parametrize("shape", [(10, 14, 10), (20, 28, 20), (5, 7, 3)])
def test_pad_and_crop_round_trip(shape):
    x = torch.randn(1, 2, *shape)
    padded, pads = pad_to_multiple(x, 4)
    assert all(s % 4 == 0 for s in padded.shape[2:])
    assert torch.equal(crop_to_shape(padded, pads), x)


@pytest.mark.parametrize(
    "groups, paper",
    [
        (ONE_GROUP, 45.19e6),
        ([[("lv", 1), ("brain", 1)], [("skull", 1)]], 45.88e6),
        ([{"semantics": 8}, {"skull": 1}], 45.88e6),
    ],
    ids=["lv", "lv+brain|skull", "semantics|skull"],
)
def test_parameter_count_at_brainldm_scale(groups, paper):
    with torch.device("meta"):
        model = VCM(spatial_dims=3, latent_channels=3, condition_groups=groups, levels=3)
    n = count_parameters(model)
    assert abs(n - paper) / paper < 0.05, n


def test_identity_at_init():
    defs = tiny_definitions(
        channels=(4, 8, 8),
        norm_num_groups=4,
        diffusion_channels=(8, 16),
        diffusion_num_head_channels=(0, 8),
        diffusion_norm_num_groups=8,
    )
    torch.manual_seed(0)
    backbone = Backbone(*build_networks(defs), definitions=defs)
    model = tiny_vcm(identity=True)
    z_t, _ = latents(2, (4, 4, 4))
    with torch.no_grad():
        eps_t = backbone.eps(z_t, torch.tensor([10, 500]), torch.rand(2, 1, 4))
        gamma, beta = model(z_t, eps_t, torch.tensor([10, 500]), conditions(2, (16, 16, 16)))
    assert not gamma.any() and not beta.any()
    assert torch.equal(modulate(eps_t, gamma, beta), eps_t)


def test_subset_probabilities_follow_the_paper():
    assert subset_probabilities(1) == {(0,): 1.0}
    probs = subset_probabilities(2)
    assert probs == pytest.approx({(0,): 0.3, (1,): 0.3, (0, 1): 0.4})
    three = subset_probabilities(3)
    assert len(three) == 7 and three[(0, 1, 2)] == pytest.approx(0.4)
    assert sum(three.values()) == pytest.approx(1.0) and () not in three


@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_keep_mask_frequencies(n_groups):
    n = 20000
    mask = sample_keep_mask(n, n_groups, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (n, n_groups) and set(mask.unique().tolist()) <= {0.0, 1.0}
    for subset, p in subset_probabilities(n_groups).items():
        row = torch.zeros(n_groups)
        row[list(subset)] = 1
        freq = (mask == row).all(dim=1).float().mean().item()
        assert abs(freq - p) < 0.015, (subset, freq, p)


def test_keep_mask_rejects_bad_probabilities():
    with pytest.raises(ValueError):
        sample_keep_mask(4, 2, {(0,): 0.5, (1,): 0.2})
    with pytest.raises(ValueError):
        sample_keep_mask(4, 2, {(0, 2): 1.0})


def test_latent_dropout_equals_missing_group():
    model = tiny_vcm()
    cond = conditions(2, (16, 16, 16))
    z_t, eps_t = latents(2, (4, 4, 4))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        only_skull = model(z_t, eps_t, t, {"skull": cond["skull"]})
        dropped = model(z_t, eps_t, t, cond, keep=torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        both = model(z_t, eps_t, t, cond)
        nothing = model(z_t, eps_t, t, {})
        none_kept = model(z_t, eps_t, t, cond, keep=torch.zeros(2, 2))
        mixed = model(z_t, eps_t, t, cond, keep=torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(only_skull, dropped, atol=1e-6, rtol=0)
    torch.testing.assert_close(nothing, none_kept, atol=1e-6, rtol=0)
    assert not torch.allclose(both[0], only_skull[0])
    # the keep mask acts per sample
    torch.testing.assert_close(mixed[0][0], both[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[0][1], only_skull[0][1], atol=1e-6, rtol=0)


def test_modality_drop_zeroes_inputs():
    model = tiny_vcm()
    cond = conditions(2, (16, 16, 16))
    dropped = model.drop_inputs(cond, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(dropped["lv"][0], cond["lv"][0]) and not dropped["lv"][1].any()
    assert not dropped["brain"][1].any() and not dropped["skull"][0].any()
    assert torch.equal(dropped["skull"][1], cond["skull"][1])


def test_partial_group_and_bad_grid_raise():
    model = tiny_vcm()
    z_t, eps_t = latents(1, (4, 4, 4))
    with pytest.raises(ValueError, match="partly given"):
        model(z_t, eps_t, torch.tensor([1]), {"lv": torch.zeros(1, 1, 16, 16, 16)})
    with pytest.raises(ValueError, match="divisible"):
        model.encode({"skull": torch.zeros(1, 1, 18, 16, 16)})


def test_cached_features_equal_forward():
    model = tiny_vcm()
    cond = conditions(2, (16, 16, 16))
    z_t, eps_t = latents(2, (4, 4, 4))
    t = torch.tensor([5, 900])
    with torch.no_grad():
        direct = model(z_t, eps_t, t, cond)
        cached = model.forward_from_features(z_t, eps_t, t, model.encode(cond))
    assert torch.equal(direct[0], cached[0]) and torch.equal(direct[1], cached[1])


def test_several_draws_share_one_subjects_features():
    model = tiny_vcm()
    cond = conditions(2, (16, 16, 16))
    z_t, eps_t = latents(6, (4, 4, 4))
    t = torch.tensor([5, 300, 900, 10, 500, 999])
    keep = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        shared = model(z_t, eps_t, t, cond, keep, draws=3)
        repeated = model(
            z_t,
            eps_t,
            t,
            {k: v.repeat_interleave(3, 0) for k, v in cond.items()},
            keep.repeat_interleave(3, 0),
        )
    torch.testing.assert_close(shared, repeated, atol=1e-6, rtol=0)
    with torch.no_grad():
        other = model(z_t, eps_t, t, {k: v.flip(0).repeat_interleave(3, 0) for k, v in cond.items()})
    assert not torch.allclose(shared[1][:3], other[1][:3])  # rows 0-2 belong to subject 0


def test_encoder_checkpointing_gives_same_gradients():
    cond = conditions(1, (16, 16, 16))
    z_t, eps_t = latents(1, (4, 4, 4))
    grads = []
    for flag in (False, True):
        model = tiny_vcm(ONE_GROUP)
        for enc in model.encoders:
            enc.use_checkpointing = flag
        model.train()
        gamma, beta = model(z_t, eps_t, torch.tensor([10]), cond)
        (gamma.square().sum() + beta.sum()).backward()
        grads.append(model.encoders[0].conv_in.conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_config_rebuilds_the_same_architecture():
    model = tiny_vcm()
    config = json.loads(json.dumps(model.config))
    rebuilt = VCM(**config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.groups == model.groups and rebuilt.n_groups == 2
    assert rebuilt.condition_names == ("lv", "brain", "skull")


@pytest.mark.parametrize(("blocks", "full_res_blocks"), [(2, 2), ([1, 2], 1), ([0, 2], 0)])
def test_encoder_blocks_per_level(blocks, full_res_blocks):
    """Fewer residual blocks at full resolution: the same feature grid, fewer parameters, a rebuildable config."""
    torch.manual_seed(0)
    model = VCM(latent_channels=3, condition_groups=TWO_GROUPS, **TINY, encoder_num_res_blocks=blocks)
    encoder = model.encoders[0]
    assert sum(isinstance(m, AEKLResBlock) for m in encoder.levels[0]) == full_res_blocks
    assert sum(isinstance(m, AEKLResBlock) for m in encoder.levels[1]) == 2
    with torch.no_grad():
        features = model.encode(conditions(2, (16, 16, 16)))
    assert features.shape == (2, 8, 4, 4, 4) and features.abs().sum() > 0
    rebuilt = VCM(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())  # strict: the same modules


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([2], "one entry per encoder level"),
        ([2, -1], "must be >= 0"),
        ([2, 0], "cannot change 4 channels to 8"),
    ],
)
def test_encoder_blocks_per_level_are_checked(blocks, message):
    with pytest.raises(ValueError, match=message):
        VCM(latent_channels=3, condition_groups=ONE_GROUP, **TINY, encoder_num_res_blocks=blocks)
