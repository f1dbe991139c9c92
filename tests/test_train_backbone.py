"""Tests of the tiny-backbone trainer (vcm.backbone_training) on a 16³ fake corpus with toy networks."""

from __future__ import annotations

import csv
import json
import logging

import h5py
import numpy as np
import pytest
import torch

from vcm.backbone_training.autoencoder import LATENTS_FILE
from vcm.backbone_training.cli import cli
from vcm.backbone_training.loop import StageLoop
from vcm.backbone_training.region import region_mask, weighted_l1
from vcm.backbone_training.samples import sample_images
from vcm.errors import StageError
from vcm.models.backbone import AUTOENCODER_FILE, DIFFUSION_FILE, NETWORK_FILE, load_bundle
from vcm.training.checkpoints import FINAL, LATEST, STALE_SUFFIX

GRID = (16, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread_deterministic():
    """One thread (the CPUs are shared) and deterministic kernels: resumption must reproduce a run exactly."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(det)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """Six smooth blob 'heads' whose size follows the covariates, in the dataset.h5 layout."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.h5"
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in GRID), indexing="ij")
    cov = rng.uniform(0, 1, (6, 4)).astype(np.float32)
    images, labels = [], []
    for c in cov:
        r = np.sqrt(x**2 + (y / 1.2) ** 2 + z**2)
        head = (r < 0.7 + 0.1 * c[3]).astype(np.float32) * 0.6
        vent = (np.sqrt((x / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.3) ** 2) < 0.3 + 0.4 * c[2]).astype(
            np.float32
        )
        images.append(np.clip(head - 0.4 * vent + 0.02 * rng.standard_normal(GRID), 0, 1))
        labels.append(np.where(vent > 0, 4, np.where(head > 0, 2, 0)).astype(np.uint16))  # FreeSurfer IDs
    with h5py.File(path, "w") as h5:
        h5["image"] = np.stack(images)[:, None].astype(np.float16)
        h5["label"] = np.stack(labels)
        h5["covariates"] = cov
        h5["splits/train"] = np.arange(1, 6)
        h5["splits/val"] = np.array([0])
    return path


def argv(corpus_file, tmp_path, *extra: str) -> list[str]:
    return [
        "--data", str(corpus_file),
        "--work-dir", str(tmp_path / "work"),
        "--out", str(tmp_path / "bundle"),
        "--ae-channels", "4,8",
        "--ae-norm-groups", "4",
        "--ae-batch", "2",
        "--dm-channels", "8,16",
        "--dm-attention", "false,true",
        "--dm-head-channels", "0,8",
        "--dm-res-blocks", "1",
        "--dm-norm-groups", "4",
        "--dm-batch", "4",
        "--checkpoint-every", "3",
        "--ae-val-every", "3",
        "--dm-val-every", "3",
        "--ddim-steps", "3",
        *extra,
    ]  # fmt: skip


def read_losses(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_loss_falls_on_a_tiny_overfit(corpus_file, tmp_path):
    """Autoencoder L1 and diffusion MSE both drop well below their start on the toy corpus."""
    code = cli(argv(corpus_file, tmp_path, "--ae-steps", "40", "--ae-lr", "3e-3", "--dm-steps", "40",
                    "--dm-lr", "2e-3", "--no-samples"))  # fmt: skip
    assert code == 0
    ae_rows = read_losses(tmp_path / "work/ae/losses.csv")
    dm_rows = read_losses(tmp_path / "work/ldm/losses.csv")
    assert [int(r["step"]) for r in ae_rows] == list(range(1, 41))
    first, last = (np.mean([float(r["l1"]) for r in rows]) for rows in (ae_rows[:5], ae_rows[-5:]))
    assert last < 0.6 * first
    first, last = (np.mean([float(r["loss"]) for r in rows]) for rows in (dm_rows[:5], dm_rows[-5:]))
    assert last < 0.8 * first
    assert (tmp_path / "work/ae/loss.png").stat().st_size > 0
    assert (tmp_path / "work/ldm/loss.png").stat().st_size > 0
    record = json.loads((tmp_path / "bundle/training_record.json").read_text())
    assert record["autoencoder"]["steps"] == 40 and record["diffusion"]["steps"] == 40
    assert record["data"]["n_train"] == 5 and record["data"]["n_val"] == 1
    assert record["autoencoder"]["val_loss"] is not None and record["diffusion"]["val_loss"] is not None


def test_bundle_loads_back_in_float32_and_has_the_right_shapes(corpus_file, tmp_path):
    assert cli(argv(corpus_file, tmp_path, "--ae-steps", "2", "--dm-steps", "2", "--sample-every", "2")) == 0
    bundle = tmp_path / "bundle"
    for rel in (AUTOENCODER_FILE, DIFFUSION_FILE):  # shipped small: float16 on disk
        state = torch.load(bundle / rel, weights_only=True)
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    network = json.loads((bundle / NETWORK_FILE).read_text())
    latents = torch.load(tmp_path / "work" / LATENTS_FILE, weights_only=True)["latents"]
    assert latents["train"].shape == (10, 3, 8, 8, 8)  # 5 images + their flips
    assert network["scale_factor"] == pytest.approx(1 / float(latents["train"].std()), rel=1e-6)
    assert network["grid"] == list(GRID)

    backbone = load_bundle(bundle)
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
    assert backbone.scale_factor == pytest.approx(network["scale_factor"])
    with torch.no_grad():
        mu, sigma = backbone.encode(torch.rand(2, 1, *GRID))
        assert mu.shape == sigma.shape == (2, 3, 8, 8, 8)
        eps = backbone.eps(torch.randn(2, 3, 8, 8, 8), torch.tensor([10, 900]), torch.rand(2, 1, 4))
        assert eps.shape == (2, 3, 8, 8, 8)
        assert backbone.decode(mu).shape == (2, 1, *GRID)
    images = sample_images(backbone, torch.rand(4), seeds=(0, 1), ddim_steps=2)
    assert images.shape == (2, 1, *GRID) and 0 <= images.min() and images.max() <= 1
    for name in ("samples.png", "loss_autoencoder.png", "loss_diffusion.png"):
        assert (bundle / name).stat().st_size > 0
    # the per-step figure draws the same two seeds per covariate setting as the bundle's, so the same panels
    from matplotlib.image import imread

    step_figure = imread(tmp_path / "work/ldm/samples_step000002.png")
    assert step_figure.shape == imread(bundle / "samples.png").shape
    (bundle / "samples.png").unlink()
    assert cli(argv(corpus_file, tmp_path, "--samples-only")) == 0
    assert (bundle / "samples.png").stat().st_size > 0


def test_resume_reproduces_an_uninterrupted_run(corpus_file, tmp_path, monkeypatch):
    """Interrupted after the step-6 checkpoint and rerun, training continues the step counter and ends with
    bitwise the same weights as a run that was never interrupted (CPU, one thread, deterministic kernels:
    tolerance 0)."""
    steps = ["--ae-steps", "9", "--dm-steps", "9", "--ae-crop", "8,12,8", "--no-samples"]
    assert cli(argv(corpus_file, tmp_path / "straight", *steps)) == 0

    save = StageLoop.checkpoint

    def interrupt_after_step_6(self):
        save(self)
        if self.name == "ldm" and self.step == 6:
            raise KeyboardInterrupt  # a killed job: the checkpoint of step 6 is on disk

    monkeypatch.setattr(StageLoop, "checkpoint", interrupt_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        cli(argv(corpus_file, tmp_path / "resumed", *steps))
    ckpt = torch.load(tmp_path / "resumed/work/ldm" / LATEST, weights_only=True)
    assert ckpt["step"] == 6
    monkeypatch.setattr(StageLoop, "checkpoint", save)
    assert cli(argv(corpus_file, tmp_path / "resumed", *steps)) == 0

    rows = read_losses(tmp_path / "resumed/work/ldm/losses.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 10))
    straight_rows = read_losses(tmp_path / "straight/work/ldm/losses.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    for rel in (AUTOENCODER_FILE, DIFFUSION_FILE):
        a = torch.load(tmp_path / "straight/bundle" / rel, weights_only=True)
        b = torch.load(tmp_path / "resumed/bundle" / rel, weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (rel, k)
    a = torch.load(tmp_path / "straight/work/ldm" / FINAL, weights_only=True)["modules"]
    b = torch.load(tmp_path / "resumed/work/ldm" / FINAL, weights_only=True)["modules"]
    for k in a["diffusion"]:  # the float32 training weights too, not only the float16 bundle
        assert torch.equal(a["diffusion"][k], b["diffusion"][k]), k


def test_a_finished_stage_is_not_retrained_and_other_networks_start_over(corpus_file, tmp_path, caplog):
    """A rerun with the same networks trains nothing; one with other networks (the project's one checkpoint
    policy, vcm.training.checkpoints) sets the old checkpoints aside as ``.stale`` with a warning and trains
    from scratch."""
    steps = ["--ae-steps", "2", "--dm-steps", "2", "--no-samples"]
    assert cli(argv(corpus_file, tmp_path, *steps)) == 0
    before = (tmp_path / "work/ae/losses.csv").read_text()
    assert cli(argv(corpus_file, tmp_path, *steps)) == 0
    assert (tmp_path / "work/ae/losses.csv").read_text() == before
    old_final = torch.load(tmp_path / "work/ae" / FINAL, weights_only=True)

    with caplog.at_level(logging.WARNING, logger="vcm.training.checkpoints"):
        assert cli(argv(corpus_file, tmp_path, *steps, "--latent-channels", "4")) == 0
    for stage in ("ae", "ldm"):
        for name in (FINAL, LATEST):
            assert (tmp_path / "work" / stage / (name + STALE_SUFFIX)).is_file(), (stage, name)
    assert "belongs to other settings" in caplog.text and "training from scratch" in caplog.text
    rows = read_losses(tmp_path / "work/ae/losses.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]  # a fresh start, not a resume of the old run
    new_final = torch.load(tmp_path / "work/ae" / FINAL, weights_only=True)
    assert new_final["signature"] != old_final["signature"]
    assert json.loads((tmp_path / "bundle" / NETWORK_FILE).read_text())["autoencoder"]["latent_channels"] == 4
    assert load_bundle(tmp_path / "bundle").latent_channels == 4


def test_bad_inputs_are_one_line_errors(corpus_file, tmp_path):
    with pytest.raises(StageError, match="not found"):
        cli(argv(tmp_path / "missing.h5", tmp_path, "--ae-steps", "1", "--dm-steps", "1"))
    with pytest.raises(StageError, match="budget"):
        cli(argv(corpus_file, tmp_path, "--dm-steps", "1"))
    with pytest.raises(StageError, match="not divisible"):
        cli(argv(corpus_file, tmp_path, "--ae-steps", "1", "--dm-steps", "1", "--ae-crop", "8,7,8"))
    with pytest.raises(StageError, match="one value per level"):
        cli(argv(corpus_file, tmp_path, "--ae-steps", "1", "--dm-steps", "1", "--dm-attention", "true"))


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_the_region_is_the_labels_dilated_by_the_margin(margin):
    labels = np.zeros((2, 9, 9, 9), np.uint16)
    labels[0, 4, 4, 4] = 43  # a right lateral ventricle voxel; image 1 has none
    labels[0, 0, 0, 0] = 2  # white matter: not in the region
    region = region_mask(labels, (4, 43), margin)
    assert region.shape == (2, 1, 9, 9, 9) and region.dtype == torch.float32
    assert region[0].sum() == (2 * margin + 1) ** 3 and region[1].sum() == 0
    assert region[0, 0, 4 - margin, 4 + margin, 4] == 1 and region[0, 0, 0, 0, 0] == 0


def test_the_weighted_l1_counts_the_region_more():
    x, recon = torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)
    recon[0, 0, 0, 0, 0] = 1.0  # the one error sits in the region
    region = torch.zeros_like(x)
    region[0, 0, 0, 0, 0] = 1.0
    assert weighted_l1(recon, x, region, 0.0).item() == pytest.approx(1 / 8)  # plain L1
    assert weighted_l1(recon, x, region, 5.0).item() == pytest.approx(6 / 13)  # 6 of 7 + 6 weight units
    assert weighted_l1(recon, x, torch.ones_like(x), 5.0).item() == pytest.approx(1 / 8)


def test_refining_the_decoder_of_a_bundle_keeps_its_latent_space(corpus_file, tmp_path):
    """--from-bundle trains the decoder alone: the encoder and the latent U-Net (model.pt, byte for byte) stay
    as they were, the decoder changes and the error near the ventricles falls; the record keeps the source's
    stages and adds the decoder's."""
    assert cli(argv(corpus_file, tmp_path, "--ae-steps", "20", "--ae-lr", "3e-3", "--dm-steps", "2")) == 0
    refined = tmp_path / "refined"
    code = cli(argv(corpus_file, tmp_path, "--from-bundle", str(tmp_path / "bundle"), "--out", str(refined),
                    "--work-dir", str(tmp_path / "work_dec"), "--dec-steps", "30", "--dec-lr", "3e-3"))  # fmt: skip
    assert code == 0
    before = torch.load(tmp_path / "bundle" / AUTOENCODER_FILE, weights_only=True)
    after = torch.load(refined / AUTOENCODER_FILE, weights_only=True)
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.float16}
    kept = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    for rel in (DIFFUSION_FILE, NETWORK_FILE):
        assert (refined / rel).read_bytes() == (tmp_path / "bundle" / rel).read_bytes(), rel
    rows = read_losses(tmp_path / "work_dec/dec/losses.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    first, last = (np.mean([float(r["region_l1"]) for r in part]) for part in (rows[:5], rows[-5:]))
    assert last < 0.8 * first
    record = json.loads((refined / "training_record.json").read_text())
    assert record["autoencoder"]["steps"] == 20 and record["decoder"]["steps"] == 30
    assert record["decoder"]["options"]["region_weight"] == 5.0
    assert record["decoder_refinement"]["from_bundle"] == str(tmp_path / "bundle")
    assert (refined / "loss_decoder.png").stat().st_size > 0
    with torch.no_grad():  # the refined bundle samples as before
        assert load_bundle(refined).decode(torch.zeros(1, 3, 8, 8, 8)).shape == (1, 1, *GRID)


@pytest.mark.parametrize("latent_noise", ["0", "0.1"])
def test_the_decoder_stage_runs_after_the_latent_unet(corpus_file, tmp_path, latent_noise):
    assert cli(argv(corpus_file, tmp_path, "--ae-steps", "2", "--dm-steps", "2", "--dec-steps", "3",
                    "--dec-latent-noise", latent_noise, "--no-samples")) == 0  # fmt: skip
    assert [int(r["step"]) for r in read_losses(tmp_path / "work/dec/losses.csv")] == [1, 2, 3]
    record = json.loads((tmp_path / "bundle/training_record.json").read_text())
    assert record["decoder"]["steps"] == 3 and record["decoder"]["val_loss"] is not None
    assert record["decoder"]["options"]["latent_noise"] == float(latent_noise)
    final = torch.load(tmp_path / "work/dec" / FINAL, weights_only=True)["modules"]["autoencoder"]
    shipped = torch.load(tmp_path / "bundle" / AUTOENCODER_FILE, weights_only=True)
    assert all(torch.equal(final[k].half(), shipped[k]) for k in shipped)


def test_the_decoder_stage_needs_labels_and_a_budget(corpus_file, tmp_path):
    assert cli(argv(corpus_file, tmp_path, "--ae-steps", "1", "--dm-steps", "1", "--no-samples")) == 0
    with pytest.raises(StageError, match="budget"):
        cli(argv(corpus_file, tmp_path, "--from-bundle", str(tmp_path / "bundle")))
    bare = tmp_path / "bare.h5"
    with h5py.File(corpus_file) as src, h5py.File(bare, "w") as h5:
        for key in ("image", "covariates", "splits/train", "splits/val"):
            h5[key] = src[key][...]
    with pytest.raises(StageError, match="no /label"):
        cli(argv(bare, tmp_path, "--from-bundle", str(tmp_path / "bundle"), "--dec-steps", "2"))


@pytest.mark.parametrize("crop", [None, "8,8,8"])
def test_the_autoencoder_can_count_the_ventricles_more(corpus_file, tmp_path, crop):
    """--ae-region-weight: the same first batch and initialisation give the same plain L1 but a different
    loss (the L1 near the ventricles counted 6x), the weights move apart, and the record says so."""
    extra = ["--ae-crop", crop] if crop else []
    runs = {}
    for weight in ("0", "5"):
        out = tmp_path / f"w{weight}"
        assert cli(argv(corpus_file, out, "--ae-steps", "4", "--dm-steps", "1", "--no-samples",
                        "--ae-region-weight", weight, *extra)) == 0  # fmt: skip
        runs[weight] = (read_losses(out / "work/ae/losses.csv"), out)
    (plain, plain_dir), (weighted, weighted_dir) = runs["0"], runs["5"]
    assert float(plain[0]["l1"]) == pytest.approx(float(weighted[0]["l1"]), rel=1e-6)
    assert float(plain[0]["loss"]) != pytest.approx(float(weighted[0]["loss"]), rel=1e-3)
    a = torch.load(plain_dir / "bundle" / AUTOENCODER_FILE, weights_only=True)
    b = torch.load(weighted_dir / "bundle" / AUTOENCODER_FILE, weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    record = json.loads((weighted_dir / "bundle/training_record.json").read_text())
    assert record["autoencoder"]["options"]["region_weight"] == 5.0
    assert record["autoencoder"]["extra"]["loss"].startswith("L1 x (1 + region_weight")


def test_the_autoencoder_region_needs_labels(corpus_file, tmp_path):
    bare = tmp_path / "bare.h5"
    with h5py.File(corpus_file) as src, h5py.File(bare, "w") as h5:
        for key in ("image", "covariates", "splits/train", "splits/val"):
            h5[key] = src[key][...]
    with pytest.raises(StageError, match="no /label.*--ae-region-weight"):
        cli(argv(bare, tmp_path, "--ae-steps", "2", "--dm-steps", "1", "--ae-region-weight", "5"))
