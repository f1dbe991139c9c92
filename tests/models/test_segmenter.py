"""The QC segmenter (vcm.models.segmenter, vcm.train_segmenter) on the 16³ phantom task."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from tests.fixtures import make_real
from vcm.errors import StageError
from vcm.grid import Grid
from vcm.labels import mask_of
from vcm.models.segmenter import (
    QCSegmenter,
    SegmenterSpec,
    label_mapping,
    load_segmenter,
    predict,
    qc_classes,
)
from vcm.train_segmenter import SegmenterSettings, train_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"steps": 80, "lr": 1e-2, "channels": [4, 8, 16], "strides": [2, 2]}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return make_real(tmp_path_factory.mktemp("seg") / "dataset.h5")


def test_classes_split_the_condition_ventricles_from_the_others():
    classes = qc_classes()
    assert list(classes)[:2] == ["lateral_ventricles", "other_ventricles"]
    assert classes["lateral_ventricles"] == [4, 43] and classes["other_ventricles"] == [5, 44, 14, 15]
    assert "ventricles" not in classes and len(classes) == 9
    assert qc_classes([4, 43, 5, 44])["other_ventricles"] == [14, 15]
    mapping = label_mapping(classes)
    assert mapping[4] == mapping[43] == 1 and mapping[14] == 2 and mapping[24] == 3


class _Constant(nn.Module):
    """Logits that pick class ``k`` everywhere."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.k, self.n = k, n

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n, *x.shape[2:])
        out[:, self.k] = 1.0
        return out


def test_labels_are_freesurfer_ids_left_and_right_by_world_x():
    grid = Grid((8, 8, 8), 10.0, (0.0, 0.0, 0.0))
    spec = SegmenterSpec(channels=[4, 8], strides=[2])
    seg = QCSegmenter(_Constant(1, 10), spec, grid.affine)
    labels = seg(np.zeros(grid.shape, np.float32))
    x_world = grid.affine[0, 0] * np.arange(8) + grid.affine[0, 3]
    assert set(np.unique(labels[x_world < 0])) == {4}  # left lateral ventricle
    assert set(np.unique(labels[x_world >= 0])) == {43}
    assert set(np.unique(QCSegmenter(_Constant(2, 10), spec, grid.affine)(np.zeros((8, 8, 8))))) == {5, 44}
    assert set(np.unique(QCSegmenter(_Constant(0, 10), spec, grid.affine)(np.zeros((8, 8, 8))))) == {0}


class _LeftHalf(nn.Module):
    """Logits that pick class 1 in the first half of axis 0 (the image's left), background elsewhere."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        half = x.shape[2] // 2
        out[:, 1, :half], out[:, 0, half:] = 10.0, 10.0
        return out


def test_mirroring_averages_the_prediction_with_that_of_the_mirrored_image():
    x = torch.rand(2, 1, 8, 6, 4)
    plain, mirrored = predict(_LeftHalf(), x), predict(_LeftHalf(), x, mirror=True)
    assert plain.shape == mirrored.shape == (2, 2, 8, 6, 4)
    assert torch.allclose(plain.sum(1), torch.ones(2, 8, 6, 4))
    assert plain[:, 1, :4].min() > 0.99 and plain[:, 1, 4:].max() < 0.01
    # the mirrored image's left is the right: the mean is undecided everywhere
    assert torch.allclose(mirrored, torch.full_like(mirrored, 0.5), atol=1e-4)


def test_trains_on_real_training_subjects_scores_validation_and_loads(tmp_path, real, cfg):
    cfg["training"]["sizes"] = [2, 4]
    out = tmp_path / "qc" / "segmenter.pt"
    report = train_segmenter(cfg, real, out, SegmenterSettings(**FAST), progress=False)
    assert report["train_split"] == "train_4" and report["n_train"] == 4 and report["n_val"] == 2
    assert torch.load(out, weights_only=True)["spec"]["mirror"] is True  # flips in training: mirrored tests
    assert report["per_subject"]["subjects"] == ["sub-06", "sub-07"]  # the validation subjects only
    assert report["lv_dice"]["mean"] > 0.6, report["lv_dice"]  # the phantom's dark LVs are easy
    low, high = report["lv_dice"]["ci95"]
    assert low <= report["lv_dice"]["mean"] <= high
    assert 0 < report["seconds_per_volume_1_thread"] < 1.0
    assert json.loads(out.with_suffix(".json").read_text())["lv_dice"] == report["lv_dice"]

    with h5py.File(real, "r") as h5:
        image, truth = np.asarray(h5["image"][6, 0], np.float32), h5["label"][6]
        affine = h5.attrs["grid_affine"]
    labels = load_segmenter(out, affine)(image)
    pred, true = mask_of(labels, (4, 43)), mask_of(truth, (4, 43))
    assert 2 * (pred & true).sum() / (pred.sum() + true.sum()) > 0.6
    again = tmp_path / "again.pt"
    train_segmenter(cfg, real, again, SegmenterSettings(**FAST), progress=False)
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed and steps: the same network


def test_a_file_from_before_mirroring_predicts_without_it(tmp_path):
    from vcm.models.segmenter import FORMAT, build_segmenter

    spec = SegmenterSpec(channels=[4, 8], strides=[2])
    old = {k: v for k, v in spec.__dict__.items() if k != "mirror"}  # the spec as files before it stored it
    torch.save(
        {"format": FORMAT, "spec": old, "state_dict": build_segmenter(spec).state_dict()}, tmp_path / "s.pt"
    )
    assert load_segmenter(tmp_path / "s.pt", np.eye(4)).spec.mirror is False


def test_missing_or_foreign_file_is_a_one_line_error(tmp_path):
    with pytest.raises(StageError, match="QC segmenter not found"):
        load_segmenter(tmp_path / "none.pt", np.eye(4))
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(StageError, match="not a vcm QC segmenter"):
        load_segmenter(tmp_path / "x.pt", np.eye(4))


def test_autoencoder_ceiling_scores_real_and_reconstructed_images(tmp_path, real, cfg):
    from tests.fixtures import make_bundle
    from vcm.label_fidelity import autoencoder_ceiling

    cfg["training"]["sizes"] = [2, 4]
    seg = tmp_path / "segmenter.pt"
    train_segmenter(cfg, real, seg, SegmenterSettings(**FAST), progress=False)
    r = autoencoder_ceiling(real, make_bundle(tmp_path / "bundle"), seg)
    assert r["subjects"] == ["sub-06", "sub-07"] and r["real"]["n"] == 2
    assert r["real"]["mean"] > 0.6  # the segmenter on the real phantoms
    assert 0 <= r["reconstruction"]["mean"] < r["real"]["mean"]  # a random autoencoder loses the anatomy


def test_bench_labels_counts_images_at_the_qc_threshold_and_pairs_a_second_bundle(
    tmp_path, real, cfg, capsys
):
    import argparse
    import json

    from tests.fixtures import make_bundle
    from vcm.bench import labels

    cfg["training"]["sizes"] = [2, 4]
    seg = tmp_path / "segmenter.pt"
    train_segmenter(cfg, real, seg, SegmenterSettings(**FAST), progress=False)
    bundle, other = make_bundle(tmp_path / "a"), make_bundle(tmp_path / "b", seed=1)
    args = argparse.Namespace(
        dataset=real,
        bundle=bundle,
        segmenter=seg,
        atlas_subjects=0,
        dice_min=0.5,
        volume_tolerance=0.15,
        against=other,
        out=tmp_path / "r.json",
    )
    labels.run(args)
    r = json.loads(args.out.read_text())
    for key in ("real", "reconstruction"):
        dice, ratios = r[key]["values"], r[key]["volume_ratios"]
        assert r[key]["reaching"] == sum(v >= 0.5 for v in dice) and r[key]["dice_min"] == 0.5
        assert len(ratios) == 2 and all(v >= 0 for v in ratios)
        assert r[key]["volume_within"] == sum(abs(v - 1) <= 0.15 for v in ratios)
        assert r[key]["both"] == sum(
            d >= 0.5 and abs(v - 1) <= 0.15 for d, v in zip(dice, ratios, strict=True)
        )
    theirs, ours = r["against"]["reconstruction"]["values"], r["reconstruction"]["values"]
    assert r["against"]["paired_difference"][0] == pytest.approx(sum(theirs) / 2 - sum(ours) / 2)
    out = capsys.readouterr().out
    assert f"{r['real']['reaching']} of 2 at >= 0.5, {r['real']['volume_within']} with the LV volume" in out
    assert "paired difference" in out
    args.against = bundle  # the same bundle: no difference
    labels.run(args)
    assert json.loads(args.out.read_text())["against"]["paired_difference"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("augment", [True, False])
def test_appearance_augmentation_changes_images_never_labels(augment):
    from vcm.segtrain import transforms

    settings = SegmenterSettings(augment=augment, flip=False, strides=[2, 2])
    rng = np.random.default_rng(0)
    image = rng.random((1, 16, 16, 16)).astype(np.float32)
    label = rng.integers(0, 3, (16, 16, 16)).astype(np.uint8)
    outs = []
    for _ in range(2):  # the seeded random state gives the same draws
        t = transforms(settings, True).set_random_state(3)
        outs.append([t({"image": image.copy(), "label": label.copy()}) for _ in range(4)])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(np.asarray(a["label"])[0], label)
    changed = [not np.allclose(np.asarray(o["image"]), image) for o in outs[0]]
    assert any(changed) if augment else not any(changed)


@pytest.mark.parametrize("spatial", [True, False])
def test_spatial_augmentation_moves_image_and_label_together(spatial):
    from vcm.segtrain import transforms

    settings = SegmenterSettings(spatial=spatial, flip=False, strides=[2, 2])
    image = np.zeros((1, 16, 16, 16), np.float32)
    image[0, 4:9, 5:12, 6:10] = 1.0  # a bright box, labelled 2
    label = (image[0] * 2).astype(np.uint8)
    t = transforms(settings, True).set_random_state(0)
    outs = [t({"image": image.copy(), "label": label.copy()}) for _ in range(6)]
    moved = [not np.array_equal(np.asarray(o["label"])[0], label) for o in outs]
    assert any(moved) if spatial else not any(moved)
    for o in outs:
        img, lab = np.asarray(o["image"])[0], np.asarray(o["label"])[0]
        assert set(np.unique(lab)) <= {0, 2}  # nearest-neighbour: still a label map
        assert img[lab == 2].mean() > 0.7 and img[lab == 0].mean() < 0.1  # the label sits on the moved box


@pytest.mark.parametrize(("decay", "as_last_step"), [(1e-12, True), (0.9, False)])
def test_the_loop_can_return_the_moving_average_of_the_weights(real, decay, as_last_step):
    """``ema_decay`` returns the average along the very trajectory the plain run takes (decay ~0: its last step)."""
    from vcm.data import RealDataset
    from vcm.segtrain import train_network, transforms

    def trained(ema_decay):
        settings = SegmenterSettings(**{**FAST, "steps": 6, "ema_decay": ema_decay})
        ds = RealDataset(
            real,
            "train_4",
            transform=transforms(settings, True).set_random_state(0),
            label_map=label_mapping(qc_classes()),
        )
        net, info = train_network(ds, settings, len(qc_classes()), progress=False)
        assert info["steps"] == 6 and not net.training
        return net.state_dict()

    last, average = trained(None), trained(decay)
    gap = max(float((last[k] - average[k]).abs().max()) for k in last)
    assert gap < 1e-6 if as_last_step else gap > 1e-4, gap
