"""Tests of the frozen backbone definitions and bundle loading (vcm.models.backbone)."""

from __future__ import annotations

import re

import pytest
import torch

from vcm.errors import StageError
from vcm.models import backbone as bb
from vcm.models.backbone import (
    AUTOENCODER_FILE,
    DIFFUSION_FILE,
    NETWORK_FILE,
    Backbone,
    build_networks,
    count_parameters,
    load_bundle,
    load_weights,
    save_bundle,
    tiny_definitions,
    to_old_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_definitions(ae_attention: bool = False) -> dict:
    """BrainLDM's architecture family (cross-attention to the covariates, resblock up/down) at toy width."""
    defs = tiny_definitions(
        channels=(4, 8, 8),
        norm_num_groups=4,
        diffusion_channels=(8, 16, 16),
        diffusion_attention_levels=(False, True, True),
        diffusion_num_head_channels=(0, 8, 16),
        diffusion_norm_num_groups=8,
        scale_factor=0.9,
    )
    if ae_attention:
        defs["autoencoder"]["attention_levels"] = [False, False, True]
    return defs


def random_backbone(defs: dict, seed: int = 0) -> Backbone:
    """Networks whose every tensor is random, so that a zero-initialised layer cannot hide a failed load."""
    torch.manual_seed(seed)
    ae, dm = build_networks(defs)
    with torch.no_grad():
        for p in [*ae.parameters(), *dm.parameters()]:
            p.copy_(torch.randn_like(p) * 0.05)
    return Backbone(ae, dm, scale_factor=defs["scale_factor"], definitions=defs)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_brainldm_parameter_counts():
    with torch.device("meta"):
        ae, dm = build_networks(bb.brainldm_definitions())
    assert abs(count_parameters(ae) - 13.77e6) / 13.77e6 < 0.01
    assert abs(count_parameters(dm) - 553.17e6) / 553.17e6 < 0.01


def test_eps_follows_the_bundle_contract():
    backbone = random_backbone(small_definitions())
    z_t = torch.randn(2, 3, 4, 4, 4)
    t = torch.tensor([7, 800])
    cov = torch.rand(2, 1, 4)
    with torch.no_grad():
        eps = backbone.eps(z_t, t, cov)
        # as the model-zoo sampler calls it: covariates broadcast as extra channels and as cross-attention context
        cov_map = cov.squeeze(1)[..., None, None, None].expand(2, 4, 4, 4, 4)
        reference = backbone.diffusion(torch.cat([z_t, cov_map], 1), timesteps=t, context=cov)
        flat_cov = backbone.eps(z_t, t, cov.squeeze(1))
        one_cov = backbone.eps(z_t[:1], 7, cov[:1])
    assert eps.shape == z_t.shape
    torch.testing.assert_close(eps, reference)
    torch.testing.assert_close(flat_cov, eps)
    torch.testing.assert_close(one_cov, eps[:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        backbone.eps(z_t, t, torch.rand(2, 1, 3))


def test_eps_pads_an_indivisible_latent():
    backbone = random_backbone(small_definitions())
    with torch.no_grad():
        eps = backbone.eps(torch.randn(1, 3, 5, 7, 5), torch.tensor([3]), torch.rand(1, 1, 4))
    assert eps.shape == (1, 3, 5, 7, 5)


def test_encode_decode_and_scale_factor():
    backbone = random_backbone(small_definitions())
    assert backbone.downsample_factor == 4 and backbone.latent_channels == 3
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        mu, sigma = backbone.encode(x)
        assert mu.shape == sigma.shape == (1, 3, 4, 4, 4)
        z = backbone.sample_latent(mu, torch.zeros_like(sigma))
        torch.testing.assert_close(z, mu * 0.9)
        torch.testing.assert_close(backbone.decode(z), backbone.autoencoder.decode(mu))


@pytest.mark.parametrize("old_format", [False, True], ids=["monai-keys", "generative-keys"])
@pytest.mark.parametrize("ae_attention", [False, True], ids=["ae-plain", "ae-attention"])
def test_bundle_round_trip(tmp_path, old_format, ae_attention):
    defs = small_definitions(ae_attention)
    source = random_backbone(defs)
    save_bundle(tmp_path, source, old_format=old_format)
    saved = torch.load(tmp_path / DIFFUSION_FILE, weights_only=True)
    saved_ae = torch.load(tmp_path / AUTOENCODER_FILE, weights_only=True)
    if old_format:
        # GenerativeModels names: CrossAttention.to_out = Sequential(Linear, Dropout); Upsample.conv
        assert any(k.endswith("attn1.to_out.0.weight") for k in saved)
        assert not any("out_proj" in k or "postconv" in k for k in (*saved, *saved_ae))
        assert any(re.fullmatch(r"decoder\.blocks\.\d+\.conv\.conv\.weight", k) for k in saved_ae)
        if ae_attention:
            assert any(k.endswith(".proj_attn.weight") for k in saved_ae)
    else:
        assert saved.keys() == source.diffusion.state_dict().keys()
    loaded = load_bundle(tmp_path)
    assert_same_weights(loaded.autoencoder, source.autoencoder)
    assert_same_weights(loaded.diffusion, source.diffusion)
    assert loaded.scale_factor == pytest.approx(0.9)
    assert load_bundle(tmp_path, scale_factor=1.0).scale_factor == 1.0
    ae, _ = build_networks(defs)
    assert load_weights(ae, tmp_path / AUTOENCODER_FILE) == ("generative" if old_format else "monai")


def test_model_zoo_layout_without_network_json(tmp_path, monkeypatch):
    """A model-zoo bundle has no configs/network.json: the BrainLDM definitions are used (shrunk here)."""
    defs = {**small_definitions(), "kind": "brainldm"}
    save_bundle(tmp_path, random_backbone(defs), old_format=True)
    (tmp_path / NETWORK_FILE).unlink()
    monkeypatch.setattr(
        bb, "brainldm_definitions", lambda scale_factor=1.0: {**defs, "scale_factor": scale_factor}
    )
    loaded = load_bundle(tmp_path)
    assert loaded.scale_factor == 1.0 and loaded.definitions["kind"] == "brainldm"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a checkpoint\n" * 10)


def _empty(path):
    path.write_bytes(b"")


def _missing(path):
    path.unlink()


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _empty, _missing], ids=["truncated", "garbage", "empty", "missing"]
)
@pytest.mark.parametrize("target", [AUTOENCODER_FILE, DIFFUSION_FILE])
def test_damaged_file_gives_one_line_error(tmp_path, damage, target):
    save_bundle(tmp_path, random_backbone(small_definitions()))
    damage(tmp_path / target)
    with pytest.raises(StageError) as info:
        load_bundle(tmp_path)
    message = str(info.value)
    assert "\n" not in message and target.split("/")[-1] in message


def test_wrong_file_gives_one_line_error(tmp_path):
    save_bundle(tmp_path, random_backbone(small_definitions()))
    (tmp_path / DIFFUSION_FILE).write_bytes((tmp_path / AUTOENCODER_FILE).read_bytes())
    with pytest.raises(StageError, match="model.pt: keys do not fit") as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)


def test_wrong_shapes_give_one_line_error(tmp_path):
    save_bundle(tmp_path, random_backbone(small_definitions()))
    other = small_definitions()
    other["autoencoder"]["latent_channels"] = 4
    ae, _ = build_networks(other)
    torch.save(ae.state_dict(), tmp_path / AUTOENCODER_FILE)
    with pytest.raises(StageError, match="autoencoder.pt: .* wrong shape") as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)


def test_old_keys_are_the_inverse_of_monai_conversion():
    _, dm = build_networks(small_definitions())
    old = to_old_state_dict(dm.state_dict())
    assert len(old) == len(dm.state_dict())
    converted = build_networks(small_definitions())[1]
    converted.load_old_state_dict(dict(old))
    assert_same_weights(converted, dm)


@pytest.mark.parametrize(("value", "weight"), [("sample", 1.0), ("mean", 0.0)])
def test_bundle_latent_sampling_round_trips(tmp_path, value, weight):
    save_bundle(tmp_path, random_backbone({**small_definitions(), "latent_sampling": value}))
    loaded = load_bundle(tmp_path)
    assert loaded.latent_sampling == value and loaded.posterior_weight == weight


def test_bundle_with_unknown_latent_sampling_is_a_one_line_error(tmp_path):
    save_bundle(tmp_path, random_backbone(small_definitions()))
    net = tmp_path / NETWORK_FILE
    net.write_text(net.read_text().replace('"latent_sampling": "mean"', '"latent_sampling": "mode"'))
    with pytest.raises(StageError, match="latent_sampling must be one of") as info:
        load_bundle(tmp_path)
    assert "\n" not in str(info.value)


def test_brainldm_bundles_sample_the_posterior():
    assert bb.brainldm_definitions()["latent_sampling"] == "sample"
    assert tiny_definitions()["latent_sampling"] == "mean"
