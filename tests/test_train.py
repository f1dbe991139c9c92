"""Training VCM / ControlNet on a frozen backbone, checkpoints, resume, DDP and previews (vcm.training).

Everything runs on a 16³ fake dataset, a tiny random backbone (latent 3×4³) and tiny control modules, one
thread per process.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from tests.fixtures import TINY_CONTROLNET, TINY_VCM, make_bundle, make_encoded
from vcm.config import load_config
from vcm.diffusion import ddpm_scheduler
from vcm.errors import StageError
from vcm.models.backbone import load_bundle
from vcm.models.build import build_model, load_model
from vcm.models.conditions import condition_groups
from vcm.models.controlnet import ControlNetControl
from vcm.models.vcm import VCM
from vcm.training.batches import TrainData, draw_batch, draw_indices, draw_timesteps
from vcm.training.checkpoints import FINAL, LATEST
from vcm.training.cli import cli, preview_cli
from vcm.training.loop import train
from vcm.training.loss import lv_region_weight, training_loss
from vcm.training.preview import noise_error, preview
from vcm.training.schedule import lr_factor, lr_factor_time
from vcm.training.settings import Settings

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_encoded(tmp_path_factory.mktemp("train"))


@pytest.fixture
def tcfg() -> dict:
    """The project config with tiny models, a few steps and test condition sets."""
    cfg = load_config(REPO / "config" / "config.yaml")
    cfg["condition_sets"] = {
        "lv": [["lv"]],
        "two": [["lv", "brain"], ["skull"]],
        "sem": [["semantics"], ["skull"]],
    }
    cfg["training"].update(
        steps=6, batch_size=2, lr=1e-3, checkpoint_every=2, seed=0, vcm=TINY_VCM, controlnet=TINY_CONTROLNET
    )
    return cfg


def run(cfg, files, out, condset="two", size=2, **kwargs):
    return train(
        cfg, files["dataset"], files["latents"], files["bundle"], condset, size, out, progress=False, **kwargs
    )


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:  # on the CPU: the runs may have trained on a GPU, the reference loaded from disk
        torch.testing.assert_close(a[key].cpu(), b[key].cpu(), atol=atol, rtol=0, msg=key)


def test_lr_warms_up_then_anneals_to_a_tenth():
    lrs = [lr_factor(s, 100, 10) for s in range(100)]
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert lrs[10] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(("override", "expected"), [(None, 6.0), (2.5, 2.5), (0, None)])
def test_minutes_override_and_zero_removes_the_budget(tcfg, override, expected):
    tcfg["training"]["minutes"] = 6.0
    assert Settings.from_config(tcfg, minutes=override).minutes == expected


def test_flip_picks_the_flipped_latent_and_flips_the_conditions(files):
    data = TrainData(files["dataset"], files["latents"], "train_4", ["lv", "skull", "semantics"])
    with h5py.File(files["latents"]) as h5, h5py.File(files["dataset"]) as ds:
        mu, sigma = h5["mu"][[1, 2]], h5["sigma"][[1, 2]]
        lv, skull = ds["cond/lv"][[1, 2]].astype(np.float32), ds["cond/skull"][[1, 2]].astype(np.float32)
        sem = ds["cond/semantics"][[1, 2]]
    cond, mu_b, sigma_b, cov = data.batch(torch.tensor([1, 2]), torch.tensor([True, False]))
    np.testing.assert_array_equal(mu_b[0].numpy(), mu[0, 1])  # flipped view of subject 1
    np.testing.assert_array_equal(mu_b[1].numpy(), mu[1, 0])
    np.testing.assert_array_equal(sigma_b[0].numpy(), sigma[0, 1])
    np.testing.assert_array_equal(cond["lv"][0].numpy(), lv[0][:, ::-1])  # axis 0 of the grid flipped
    np.testing.assert_array_equal(cond["lv"][1].numpy(), lv[1])
    np.testing.assert_array_equal(cond["skull"][0].numpy(), skull[0][:, ::-1])
    assert not np.array_equal(lv[0], lv[0][:, ::-1])  # the fixture's LV is asymmetric
    # semantics: one-hot without background, flipped too
    assert cond["semantics"].shape == (2, 8, 16, 16, 16)
    np.testing.assert_array_equal(cond["semantics"][0, 3].numpy(), (sem[0, 0] == 4)[::-1].astype(np.float32))
    assert cov.shape == (2, 1, 4)


@pytest.mark.parametrize("draws", [1, 3])
def test_ranks_draw_slices_of_the_same_global_batch(files, draws):
    data = TrainData(files["dataset"], files["latents"], "train_4", ["lv"])
    alphas = ddpm_scheduler().alphas_cumprod
    probs = {(0,): 0.5, (0, 1): 0.5}

    def draw(part):
        g = torch.Generator().manual_seed(7)
        return draw_batch(data, 4, g, alphas, 0.9, True, probs, 2, part, posterior_weight=0.0, draws=draws)

    whole, first, second = draw(slice(None)), draw(slice(0, 2)), draw(slice(2, 4))
    for name in ("z_t", "t", "noise", "cov", "keep", "flip"):
        torch.testing.assert_close(
            torch.cat([getattr(first, name), getattr(second, name)]), getattr(whole, name)
        )
    torch.testing.assert_close(
        torch.cat([first.conditions["lv"], second.conditions["lv"]]), whole.conditions["lv"]
    )
    assert whole.flip.any() and not whole.flip.all()  # seed 7 flips some samples: both paths are exercised
    # one condition row per subject, `draws` latent rows: the same clean latent under different noise levels
    assert whole.conditions["lv"].shape[0] == 4 and whole.z_t.shape[0] == whole.t.shape[0] == 4 * draws
    a = alphas[whole.t].reshape(-1, 1, 1, 1, 1)
    z0 = ((whole.z_t - (1 - a).sqrt() * whole.noise) / a.sqrt()).reshape(4, draws, *whole.z_t.shape[1:])
    torch.testing.assert_close(z0, z0[:, :1].expand_as(z0), atol=2e-3, rtol=0)  # 1/sqrt(a) amplifies rounding
    assert whole.t.unique().numel() == 4 * draws  # every row draws its own time step


def test_cubic_time_steps_favour_the_noisy_end():
    g = torch.Generator().manual_seed(0)
    uniform, cubic = draw_timesteps(20000, 1000, g), draw_timesteps(20000, 1000, g, "cubic")
    assert uniform.min() >= 0 and cubic.min() >= 0 and uniform.max() <= 999 and cubic.max() <= 999
    assert (uniform >= 870).float().mean() == pytest.approx(0.13, abs=0.01)
    assert (cubic >= 870).float().mean() == pytest.approx(0.5, abs=0.02)  # u < 0.13^(1/3) ~ 0.507
    with pytest.raises(ValueError, match="timesteps"):
        draw_timesteps(2, 1000, g, "logit")


def test_noise_draws_and_cubic_steps_train_and_are_checked(tmp_path, files, tcfg):
    tcfg["training"].update(steps=3, noise_draws=2, timesteps="cubic")
    result = run(tcfg, files, tmp_path / "k2")
    assert len(result.history["loss"]) == 3 and np.isfinite(result.history["loss"]).all()
    init = build_model("vcm", result.model.groups, load_bundle(files["bundle"]), TINY_VCM)
    assert not torch.equal(result.model.head_beta.conv.weight.cpu(), init.head_beta.conv.weight.cpu())
    tcfg["training"]["timesteps"] = "logit"
    with pytest.raises(StageError, match="training.timesteps"):
        Settings.from_config(tcfg)


def test_posterior_weight_zero_trains_on_posterior_means_with_the_same_random_stream(files):
    data = TrainData(files["dataset"], files["latents"], "train_4", ["lv"])
    alphas = ddpm_scheduler().alphas_cumprod
    sampled = draw_batch(data, 4, torch.Generator().manual_seed(3), alphas, 0.9, True)
    means = draw_batch(data, 4, torch.Generator().manual_seed(3), alphas, 0.9, True, posterior_weight=0.0)
    for name in ("t", "noise", "flip"):
        torch.testing.assert_close(getattr(means, name), getattr(sampled, name))
    view = means.flip.long()
    idx = draw_indices(len(data), 4, torch.Generator().manual_seed(3))  # the first draw of a batch
    mu = data.mu[idx, view]
    a = alphas[means.t].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(means.z_t, a.sqrt() * mu * 0.9 + (1 - a).sqrt() * means.noise)
    assert not torch.allclose(means.z_t, sampled.z_t)  # the fixture's sigma is not zero


def test_minutes_budget_stops_training_with_the_schedule_annealed(tmp_path, files, tcfg):
    tcfg["training"].update(steps=10_000, minutes=0.05, checkpoint_every=10_000, min_lr_ratio=0.1)
    result = run(tcfg, files, tmp_path / "budget")
    assert result.extra["stopped"] == "time budget" and 2 <= result.step < 10_000
    assert result.history["elapsed_s"][-1] >= 3.0 > result.history["elapsed_s"][-2]
    ckpt = torch.load(tmp_path / "budget" / "checkpoints" / FINAL, weights_only=True)
    assert ckpt["scheduler"]["total_steps"] == result.step == result.total_steps
    # warm-up, then the cosine follows the elapsed time and ends near lr / 10 when the budget is spent
    lrs, peak = result.history["lr"], tcfg["training"]["lr"]
    assert lrs[0] < 0.5 * peak and max(lrs) > 0.5 * peak and lrs[-1] < 0.2 * peak
    assert lr_factor_time(1.0) == pytest.approx(0.1) and lr_factor_time(0.05) == pytest.approx(1.0)
    assert (tmp_path / "budget" / "vcm.pt").is_file()


def test_loss_falls_when_overfitting_a_tiny_batch(files, tcfg):
    """The training loss on one fixed batch, optimised: VCM learns to correct the random backbone."""
    backbone = load_bundle(files["bundle"])
    groups = condition_groups(tcfg, "two")
    torch.manual_seed(0)
    model = build_model("vcm", groups, backbone, TINY_VCM).train()
    data = TrainData(files["dataset"], files["latents"], "train_2", ["lv", "brain", "skull"])
    cond, mu, sigma, cov = data.batch(torch.tensor([0, 1]), torch.tensor([False, True]))
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(mu.shape, generator=g), torch.tensor([100, 500])
    z_t = ddpm_scheduler().add_noise(mu + sigma * torch.randn(mu.shape, generator=g), noise, t)
    keep = torch.ones(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = training_loss(model, model, backbone, z_t, t, noise, cov, cond, keep)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 1.14 -> 0.71
    assert max(losses[-5:]) < min(losses[:3]), losses


def test_lv_region_weight_covers_the_ventricles_and_their_walls():
    lv = torch.zeros(2, 1, 16, 16, 16)
    lv[0, :, 4:8, 4:8, 4:8] = 1.0  # exactly latent voxel (1, 1, 1) at factor 4
    w = lv_region_weight(lv, (4, 4, 4), 5.0, draws=3)
    assert w.shape == (6, 1, 4, 4, 4)
    torch.testing.assert_close(w[3:], torch.ones(3, 1, 4, 4, 4))  # sample 1 (no LV) x 3 draws: uniform
    assert torch.equal(w[0], w[2])
    assert w[0, 0, 1, 1, 1] == 6.0 and w[0, 0, 2, 2, 2] == 6.0  # the voxel and its neighbours
    assert w[0, 0, 3, 3, 3] == 1.0 and w[0, 0, 3, 1, 1] == 1.0  # two latent voxels away


def test_lv_weight_weighs_sets_with_an_lv_condition_only(files, tcfg):
    backbone = load_bundle(files["bundle"])
    data = TrainData(files["dataset"], files["latents"], "train_2", ["lv", "brain", "skull"])
    cond, mu, _, cov = data.batch(torch.tensor([0, 1]), torch.tensor([False, False]))
    t, noise = torch.tensor([100, 500]), torch.randn(mu.shape)
    for name, names in (("two", ("lv", "brain", "skull")), ("skull", ("skull",))):
        tcfg["condition_sets"]["skull"] = [["skull"]]
        torch.manual_seed(0)
        model = build_model("vcm", condition_groups(tcfg, name), backbone, TINY_VCM)
        with torch.no_grad():  # away from the identity, so that the modulated error differs by voxel
            model.head_beta.conv.bias.fill_(0.3)
        given = {k: cond[k] for k in names}
        plain = training_loss(model, model, backbone, mu, t, noise, cov, given)
        weighted = training_loss(model, model, backbone, mu, t, noise, cov, given, lv_weight=10.0)
        assert torch.isfinite(weighted)
        assert torch.isclose(weighted, plain) == (name == "skull"), name  # no lv: the paper's loss


@pytest.mark.parametrize("method", ["vcm", "controlnet"])
def test_a_step_budget_gives_the_same_model_twice(tmp_path, files, tcfg, method):
    """The demo trains a fixed number of steps, not minutes: the same config and seed, the same model."""
    assert tcfg["training"]["minutes"] is None  # the project config: no wall-clock budget
    tcfg["training"]["methods"] = [method]
    a = run(tcfg, files, tmp_path / "a")
    b = run(tcfg, files, tmp_path / "b")
    assert a.step == b.step == tcfg["training"]["steps"]
    assert isinstance(a.model, ControlNetControl if method == "controlnet" else VCM)
    assert_same_state(a.model.state_dict(), b.model.state_dict(), atol=0.0)
    other = copy.deepcopy(tcfg)
    other["training"]["seed"] = 1
    c = run(other, files, tmp_path / "c")
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_a_resume_on_another_thread_count_is_recorded_and_warned(tmp_path, files, tcfg, caplog):
    """The 1-thread part of an interrupted run sums in another order than the 2-thread rest: say so."""
    run(tcfg, files, tmp_path, stop_after=3)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    with caplog.at_level("WARNING", logger="vcm.training.loop"):
        resumed = run(tcfg, files, tmp_path)
    assert resumed.resumed_from == 3
    assert "on 2 CPU threads a run that trained on 1" in caplog.text
    assert torch.load(tmp_path / "checkpoints" / FINAL, weights_only=True)["cpu_threads"] == [1, 2]
    assert torch.load(tmp_path / "vcm.pt", weights_only=True)["cpu_threads"] == [1, 2]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vcm.training.loop"):
        run(tcfg, files, tmp_path / "again", stop_after=3)
        run(tcfg, files, tmp_path / "again")  # the same count: nothing to say
    assert "CPU threads" not in caplog.text
    assert torch.load(tmp_path / "again" / "checkpoints" / FINAL, weights_only=True)["cpu_threads"] == [2, 2]
    assert torch.load(tmp_path / "again" / "vcm.pt", weights_only=True)["cpu_threads"] == [
        2
    ]  # as uninterrupted


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, files, tcfg):
    full = run(tcfg, files, tmp_path / "full")
    part = run(tcfg, files, tmp_path / "resumed", stop_after=3)
    assert part.step == 3 and part.model_path is None
    assert (tmp_path / "resumed" / "checkpoints" / LATEST).is_file()
    assert not (tmp_path / "resumed" / "vcm.pt").exists()  # the declared output only at the end
    resumed = run(tcfg, files, tmp_path / "resumed")
    assert resumed.resumed_from == 3 and resumed.step == 6
    # same process, same thread count, same draws: identical on CPU (tolerance 0)
    assert_same_state(full.model.state_dict(), resumed.model.state_dict(), atol=0.0)
    assert resumed.history["loss"] == pytest.approx(full.history["loss"], abs=0.0)

    # checkpoints and the model load with weights_only=True and hold what a resume needs
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / FINAL, weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "rng", "config", "history"} <= ckpt.keys()
    assert ckpt["step"] == 6 and ckpt["scheduler"]["total_steps"] == 6
    assert ckpt["resumed_at"] == []  # uninterrupted; the resumed run's final checkpoint says where it resumed
    assert torch.load(tmp_path / "resumed" / "checkpoints" / FINAL, weights_only=True)["resumed_at"] == [3]
    assert torch.load(tmp_path / "full" / "checkpoints" / LATEST, weights_only=True)["step"] == 4
    meta = torch.load(tmp_path / "full" / "vcm.pt", weights_only=True)
    assert meta["method"] == "vcm" and meta["condition_set"] == "two" and meta["steps"] == 6
    assert meta["condition_groups"] == [[["lv", 1], ["brain", 1]], [["skull", 1]]]
    assert len(meta["backbone_sha256"]) == 64 and "config_yaml" in meta["provenance"]
    model, _ = load_model(tmp_path / "full" / "vcm.pt")
    assert isinstance(model, VCM)
    assert_same_state(model.state_dict(), full.model.state_dict())

    rows = list(csv.DictReader(open(tmp_path / "full" / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(float(r["grad_norm"]) > 0 for r in rows)
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0

    # a rerun after the final checkpoint trains nothing and rewrites the model
    (tmp_path / "full" / "vcm.pt").unlink()
    again = run(tcfg, files, tmp_path / "full")
    assert again.resumed_from == 6 and (tmp_path / "full" / "vcm.pt").is_file()
    # a changed configuration does not resume from another run's checkpoint
    other = copy.deepcopy(tcfg)
    other["training"]["lr"] = 2e-3
    assert run(other, files, tmp_path / "full", stop_after=1).resumed_from == 0
    # ... and sets the other run's checkpoints aside instead of deleting them
    assert (tmp_path / "full" / "checkpoints" / f"{FINAL}.stale").is_file()


def _ddp_worker(rank: int, world: int, init_file: str, cfg: dict, files: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run(cfg, files, out)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_on_cpu_matches_one_process(tmp_path, files, tcfg):
    tcfg["training"].update(steps=3, batch_size=4)
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "pg"), tcfg, files, str(tmp_path / "ddp")),
        nprocs=2,
        join=True,
    )
    ddp, ddp_meta = load_model(tmp_path / "ddp" / "vcm.pt")
    assert ddp_meta["processes"] == 2 and ddp_meta["steps"] == 3
    # the global batch is drawn identically and split, so DDP's mean gradient is the 1-process gradient up to
    # the order of float sums; Adam's normalisation amplifies that on near-zero gradients (measured: 1.4e-5
    # after 3 steps at lr 1e-3, i.e. < 1 % of the largest possible move 3 * lr), hence atol 1e-4
    single = run(tcfg, files, tmp_path / "single")
    assert_same_state(ddp.state_dict(), single.model.state_dict(), atol=1e-4)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / FINAL, weights_only=True)
    assert ckpt["history"]["loss"] == pytest.approx(single.history["loss"], abs=1e-5)


def test_controlnet_starts_as_the_backbone_then_trains_and_saves(tmp_path, files, tcfg):
    backbone = load_bundle(files["bundle"])
    torch.manual_seed(0)
    net = build_model("controlnet", condition_groups(tcfg, "two"), backbone, TINY_CONTROLNET)
    assert isinstance(net, ControlNetControl)
    g = torch.Generator().manual_seed(0)
    z, cov = torch.randn(2, 3, 4, 4, 4, generator=g), torch.rand(2, 1, 4, generator=g)
    cond = torch.rand(2, 3, 16, 16, 16, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():  # zero-initialised residuals: exactly the frozen model
        torch.testing.assert_close(net(backbone, z, t, cov, cond), backbone.eps(z, t, cov))

    tcfg["training"].update(methods=["controlnet"], steps=2)
    result = run(tcfg, files, tmp_path / "cn")
    model, meta = load_model(tmp_path / "cn" / "vcm.pt")
    assert meta["method"] == "controlnet" and isinstance(model, ControlNetControl)
    assert_same_state(model.state_dict(), result.model.state_dict())
    with torch.no_grad():  # cohort.control_scale multiplies the trained residuals: 0 is the frozen model
        assert not torch.allclose(model(backbone, z, t, cov, cond), backbone.eps(z, t, cov), atol=1e-6)
        torch.testing.assert_close(model(backbone, z, t, cov, cond, 0.0), backbone.eps(z, t, cov))
    # the backbone stays frozen: its weights are not in the ControlNet's file
    assert not any(k.startswith("diffusion.") for k in model.state_dict())


def test_input_level_modality_drop_and_semantics(tmp_path, files, tcfg):
    tcfg["training"].update(steps=2, modality_dropout="input")
    result = run(tcfg, files, tmp_path / "sem", condset="sem", size=4)
    assert result.step == 2 and all(np.isfinite(result.history["loss"]))
    meta = torch.load(tmp_path / "sem" / "vcm.pt", weights_only=True)
    assert meta["condition_groups"] == [[["semantics", 8]], [["skull", 1]]]
    assert meta["settings"]["modality_dropout"] == "input"


def test_preview_writes_images_montage_and_lv_dice(tmp_path, files, tcfg, template_dir):
    backbone = load_bundle(files["bundle"])
    torch.manual_seed(0)
    model = build_model("vcm", condition_groups(tcfg, "lv"), backbone, TINY_VCM)  # identity at init
    meta = {"method": "vcm", "condition_set": "lv", "condition_groups": [[["lv", 1]]]}
    out = tmp_path / "preview"
    metrics = preview(
        model, meta, backbone, files["dataset"], out, 1, 3, template_dir=template_dir, progress=False
    )
    for name in ("controlled", "uncontrolled", "reconstruction", "real", "lv"):
        assert (out / f"sub-04_{name}.nii.gz").is_file()
    assert (out / "preview.png").stat().st_size > 0
    assert json.loads((out / "preview_metrics.json").read_text()) == metrics
    assert metrics["steps"] == 3 and [s["subject"] for s in metrics["subjects"]] == ["sub-04"]
    assert 0.0 <= metrics["lv_dice_controlled"] <= 1.0
    # an identity VCM from the same noise generates the uncontrolled image exactly
    assert metrics["lv_dice_controlled"] == metrics["lv_dice_uncontrolled"]
    import nibabel as nib

    img = nib.load(out / "sub-04_controlled.nii.gz")
    with h5py.File(files["dataset"]) as h5:
        np.testing.assert_allclose(img.affine, h5.attrs["grid_affine"])
    np.testing.assert_array_equal(img.get_fdata(), nib.load(out / "sub-04_uncontrolled.nii.gz").get_fdata())
    # the ceiling: the decoded posterior mean of the real image
    real = torch.from_numpy(nib.load(out / "sub-04_real.nii.gz").get_fdata().astype(np.float32))[None, None]
    with torch.no_grad():
        expected = backbone.decode(backbone.encode(real)[0] * backbone.scale_factor)[0, 0].numpy()
    recon = nib.load(out / "sub-04_reconstruction.nii.gz").get_fdata()
    np.testing.assert_allclose(recon, expected, atol=1e-4)
    assert 0.0 <= metrics["lv_dice_reconstruction"] <= 1.0
    # the held-out objective: an identity VCM is the backbone; a trained-looking one is not
    errors = metrics["noise_error"]
    assert [r["t"] for r in errors] == [50, 200, 400, 600, 800, 950]
    assert all(r["ratio"] == 1.0 and r["backbone"] > 0 for r in errors)
    torch.nn.init.normal_(model.head_beta.conv.weight, std=0.5)
    with h5py.File(files["dataset"]) as h5:
        i = int(np.sort(h5["splits/val"][:])[0])
        real = torch.from_numpy(h5["image"][i : i + 1].astype(np.float32))
        cond = {"lv": torch.from_numpy(h5["cond/lv"][i : i + 1].astype(np.float32))}
        cov = torch.from_numpy(h5["covariates"][i : i + 1].astype(np.float32)).unsqueeze(1)
    z0 = backbone.encode(real)[0] * backbone.scale_factor
    moved = noise_error(model, "vcm", backbone, z0, cond, cov, (500,), repeats=2)
    assert moved[0]["ratio"] > 1.0 and moved[0]["backbone"] == pytest.approx(
        noise_error(model, "vcm", backbone, z0, cond, cov, (500,), repeats=2)[0]["backbone"]
    )


def test_cli_trains_controlnet_and_previews(tmp_path, files, capsys):
    """The stages as the rule calls them, with a schema-valid config (ControlNet on the tiny backbone)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["condition_sets"] = {"lv": [["lv"]]}
    cfg["training"].update(steps=2, batch_size=2, checkpoint_every=1)
    cfg["cohort"].update(sets=[], steps=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    common = ["--config", str(tmp_path / "config.yaml"), "--dataset", str(files["dataset"])]
    common += ["--bundle", str(files["bundle"]), "--device", "cpu", "--threads", "1"]
    out = tmp_path / "models" / "lv" / "n2"
    args = [*common, "--latents", str(files["latents"]), "--condition-set", "lv", "--size", "2"]
    assert cli([*args, "--out-dir", str(out), "--method", "controlnet"]) == 0
    assert "2 steps" in capsys.readouterr().out
    for name in ("vcm.pt", "loss.csv", "loss.png", "preview/preview.png", "preview/preview_metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "preview" / "preview_metrics.json").read_text())
    assert metrics["method"] == "controlnet" and metrics["lv_dice_controlled"] is None  # no template given
    assert len(metrics["subjects"]) == 2
    assert (
        preview_cli(
            [*common, "--model", str(out / "vcm.pt"), "--out-dir", str(tmp_path / "p"), "--subjects", "1"]
        )
        == 0
    )
    assert (tmp_path / "p" / "sub-04_controlled.nii.gz").is_file()


def test_one_line_errors(tmp_path, files, tcfg):
    with pytest.raises(StageError, match="unknown condition set 'nope'"):
        run(tcfg, files, tmp_path / "x", condset="nope")
    with pytest.raises(StageError, match=r"no split 'train_3' \(have: train_2, train_4, val\)"):
        run(tcfg, files, tmp_path / "x", size=3)
    other = make_bundle(tmp_path / "other", seed=1)
    with pytest.raises(StageError, match="another backbone bundle"):
        train(tcfg, files["dataset"], files["latents"], other, "lv", 2, tmp_path / "x", progress=False)
    with pytest.raises(StageError, match="not a vcm model file"):
        (tmp_path / "bad.pt").write_bytes(b"junk")
        load_model(tmp_path / "bad.pt")
