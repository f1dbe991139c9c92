"""The privacy screen (vcm.privacy): a copy of a real training subject is flagged, another subject is not, the
real-to-real baseline excludes self-matches, the comparison grid and the settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.fixtures import make_real, phantom
from vcm.config import validate_config
from vcm.errors import StageError
from vcm.privacy import PRIVACY_FIELDS, PrivacySettings, RealSubjects, coarsen_image, coarsen_labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """An 8-phantom dataset.h5 on a 16³ grid of 10 mm voxels; subjects 0-3 are the training split train_4."""
    return make_real(tmp_path_factory.mktemp("privacy") / "dataset.h5")


@pytest.fixture(scope="module")
def reals(dataset) -> RealSubjects:
    return RealSubjects.from_dataset(dataset, [3, 1, 0, 2], spacing_mm=10.0, grid_spacing_mm=10.0)


def real_subject(dataset: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(dataset, "r") as h5:
        return np.asarray(h5["image"][index, 0], np.float32), np.asarray(h5["label"][index])


def test_a_copy_of_a_real_subject_is_flagged(reals, dataset):
    assert reals.subjects == ["sub-00", "sub-01", "sub-02", "sub-03"]  # sorted, as the split is read
    image, label = real_subject(dataset, 2)
    dice = reals.label_dices(label)
    assert dice[2] == pytest.approx(1.0) and (dice[[0, 1, 3]] < 1).all()
    result = reals.screen(image, dice, max_similarity=0.9)
    assert result.nearest_real == "sub-02" and result.nearest_index == 2
    assert result.nearest_similarity == pytest.approx(1.0, abs=1e-5)
    assert result.nearest_label_dice == pytest.approx(1.0) and result.max_label_dice == pytest.approx(1.0)
    assert result.possible_copy and result.reason.startswith("possible copy of sub-02")
    assert list(result.record()) == list(PRIVACY_FIELDS)


def test_another_subject_is_not_flagged(reals):
    image, label = phantom(np.random.default_rng(99))  # a phantom none of the real subjects was drawn from
    dice = reals.label_dices(label)
    result = reals.screen(image, dice, max_similarity=0.9)
    sims = reals.similarities(image)
    assert result.nearest_similarity == pytest.approx(sims.max()) and sims.max() < 0.9
    assert not result.possible_copy
    assert result.nearest_real == reals.subjects[int(np.argmax(sims))]
    assert result.nearest_label_dice == pytest.approx(dice[int(np.argmax(sims))])
    assert result.max_label_dice == pytest.approx(dice.max()) and 0 < dice.max() < 1
    # the same image brightened and shifted in contrast is the same image to a correlation
    assert reals.similarities(0.5 * image + 0.2) == pytest.approx(sims, abs=1e-5)


def test_the_baseline_excludes_self_matches(reals, dataset):
    base = reals.baseline()
    assert base.subjects == reals.subjects
    assert all(n != s for n, s in zip(base.nearest_real, base.subjects, strict=True))
    assert ((base.similarity > 0) & (base.similarity < 0.99)).all()  # not the self-match's 1
    gram = np.array([reals.similarities(real_subject(dataset, i)[0]) for i in range(4)])
    np.fill_diagonal(gram, -np.inf)
    np.testing.assert_allclose(base.similarity, gram.max(axis=1), atol=1e-5)
    assert base.nearest_real == [reals.subjects[j] for j in gram.argmax(axis=1)]


def test_the_comparison_grid():
    image = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    coarse = coarsen_image(image, 2)
    assert coarse.shape == (2, 3, 1) and coarse[0, 0, 0] == pytest.approx(image[:2, :2, :2].mean())
    assert coarsen_image(np.zeros((5, 5, 5)), 2).shape == (2, 2, 2)  # a trailing partial block is dropped
    labels = np.arange(4 * 6 * 2).reshape(4, 6, 2)
    assert (
        coarsen_labels(labels, 2).shape == (2, 3, 1) and coarsen_labels(labels, 2)[0, 0, 0] == labels[1, 1, 1]
    )
    np.testing.assert_array_equal(coarsen_labels(labels, 1), labels)


def test_settings_from_the_validated_config():
    cfg = validate_config({})
    settings = PrivacySettings.from_config(cfg)
    assert settings == PrivacySettings()  # the schema's defaults are the class's
    assert settings.factor(1.0) == 2 and settings.factor(4.0) == 1 and settings.factor(0.7) == 3
    cfg["qc"]["privacy"]["max_similarity"] = 1.5
    with pytest.raises(StageError, match="qc.privacy.max_similarity"):
        PrivacySettings.from_config(cfg)
