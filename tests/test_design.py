"""cohort.design (vcm.cohort.design) and steered anatomy (vcm.cohort.steer): targets, draws, CSV, steering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vcm.cohort.design import COVARIATES, PRESETS, Design
from vcm.cohort.steer import steer_label
from vcm.config import validate_config
from vcm.errors import ConfigError, StageError
from vcm.labels import brain_mask, mask_of

REPO = Path(__file__).resolve().parent.parent
SOURCE = {"sex": 0.0, "age": 55.0, "lv_volume": 20_000.0, "brain_volume": 1_300_000.0}


def _design(design: dict) -> Design:
    cfg = validate_config({"cohort": {"design": design}})
    cfg["conditions"]["covariate_ranges"] = str(REPO / "resources" / "covariate_ranges.yaml")
    return Design.from_config(cfg)


def test_no_design_keeps_every_source_value():
    d = _design({})
    assert not d.any and d.draw(0, 3, SOURCE) == SOURCE


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_expand_and_explicit_keys_win(preset):
    d = _design({"preset": preset, "age": {"uniform": {"low": 60, "high": 61}}})
    assert d.designed("lv_volume") and d.designed("sex") and not d.designed("brain_volume")
    assert d.targets["lv_volume"] == PRESETS[preset]["lv_volume"]
    ages = [d.draw(0, i, SOURCE)["age"] for i in range(20)]
    assert min(ages) >= 60 and max(ages) <= 61  # the explicit age, not the preset's


def test_draws_are_deterministic_per_subject_and_independent_per_covariate():
    spec = {"lv_volume": {"lognormal": {"median": 36, "sigma": 0.35}}, "sex": {"bernoulli": 0.5}}
    a = [_design(spec).draw(0, i, SOURCE) for i in range(200)]
    b = [_design(spec).draw(0, i, SOURCE) for i in (150, 3)]
    assert b == [a[150], a[3]]  # subject i's targets depend on (seed, i) only, not on which others are drawn
    with_age = _design({**spec, "age": {"normal": {"mean": 70, "sd": 5}}})
    assert [with_age.draw(0, i, SOURCE)["lv_volume"] for i in range(5)] == [x["lv_volume"] for x in a[:5]]
    assert [x["age"] for x in a] == [55.0] * 200  # source
    lv = np.array([x["lv_volume"] for x in a])
    assert np.median(lv) == pytest.approx(36_000, rel=0.1)  # mL in the config, mm³ drawn
    assert 0.35 < np.mean([x["sex"] for x in a]) < 0.65 and {x["sex"] for x in a} == {0.0, 1.0}
    assert _design(spec).draw(1, 0, SOURCE) != a[0]  # another cohort.seed, other targets


def test_draws_are_clipped_to_the_covariate_ranges():
    d = _design({"age": {"normal": {"mean": 90, "sd": 30}}, "lv_volume": {"uniform": {"low": 1, "high": 2}}})
    draws = [d.draw(0, i, SOURCE) for i in range(50)]
    assert min(x["age"] for x in draws) >= 44 and max(x["age"] for x in draws) == 82
    assert {x["lv_volume"] for x in draws} == {6995.68}  # the range's low end


def test_csv_targets_by_subject_index_and_row_order(tmp_path):
    indexed = tmp_path / "targets.csv"
    indexed.write_text("subject_index,lv,age\n2,50,70\n0,30,61\n")
    d = _design({"lv_volume": {"csv": str(indexed), "column": "lv"}, "age": {"csv": str(indexed)}})
    assert d.draw(0, 2, SOURCE)["lv_volume"] == 50_000 and d.draw(0, 0, SOURCE)["age"] == 61
    with pytest.raises(StageError, match=r"targets.csv: no row for subject_index 1 \(cohort.design.age"):
        d.draw(0, 1, SOURCE)
    rows = tmp_path / "rows.csv"
    rows.write_text("sex\n1\n0\n")
    assert [_design({"sex": {"csv": str(rows)}}).draw(0, i, SOURCE)["sex"] for i in (0, 1)] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("age\n70\n", "lv", r"bad.csv: no column 'lv' for cohort.design.lv_volume"),
        ("lv\n40\nlarge\n", "lv", r"bad.csv: column 'lv' row 2: 'large' is not a number"),
        ("subject_index,lv\n0,40\n0,50\n", "lv", r"bad.csv: column 'subject_index' must hold distinct"),
    ],
)
def test_csv_errors_name_the_file_and_column(tmp_path, text, column, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(StageError, match=message):
        _design({"lv_volume": {"csv": str(tmp_path / "bad.csv"), "column": column}})


@pytest.mark.parametrize(
    ("design", "message"),
    [
        ({"age": {"normal": {"mean": 70}}}, r"'cohort.design.age.normal': 'sd' is a required property"),
        ({"sex": {"bernoulli": 1.5}}, r"'cohort.design.sex.bernoulli': 1.5 is greater than the maximum of 1"),
        ({"preset": "old"}, r"'cohort.design.preset': 'old' is not one of"),
        ({"lv_volume": "median"}, r"'cohort.design.lv_volume': 'median' is not valid"),
    ],
)
def test_schema_errors_name_the_key(design, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"cohort": {"design": design}})


def test_a_uniform_with_low_above_high_is_refused():
    with pytest.raises(ConfigError, match=r"'cohort.design.age': uniform low 80 > high 60"):
        _design({"age": {"uniform": {"low": 80, "high": 60}}})


# --- the source a designed subject is steered from --------------------------------------------------------


class _Sources:
    """What :func:`choose_source` reads of a dataset: the sources' native LV volumes (mm³)."""

    def __init__(self, lv_ml: list[float]) -> None:
        self.lv = np.asarray(lv_ml, np.float64) * 1000

    def lv_volumes(self, indices: np.ndarray) -> np.ndarray:
        return self.lv[indices]


def _settings(ratio: float | None, seed: int = 0):
    from vcm.cohort.plan import CohortSettings

    cfg = validate_config({"cohort": {"match_lv_ratio": ratio, "seed": seed}})
    return CohortSettings.from_config(cfg)


LV_DESIGN = {"lv_volume": {"lognormal": {"median": 40, "sigma": 0.5}}}
SOURCES_ML = [8, 10, 14, 20, 25, 30, 36, 45, 60, 90]


@pytest.mark.parametrize("ratio", [1.25, 1.5, 2.0])
def test_a_designed_subject_is_steered_from_a_source_near_its_lv_target(ratio):
    from vcm.cohort.sources import choose_source

    design, data, sources = _design(LV_DESIGN), _Sources(SOURCES_ML), np.arange(len(SOURCES_ML))
    chosen, pushes = [], []
    for i in range(200):
        src = choose_source(i, _settings(ratio), data, sources, design)
        target = design.target("lv_volume", 0, i)
        push = target / data.lv[src]
        nearest = np.min(np.abs(np.log(target / data.lv)))
        # within the ratio when some source is; the nearest source when none is
        assert abs(np.log(push)) <= max(np.log(ratio), nearest) + 1e-9, (i, target, data.lv[src])
        chosen.append(src)
        pushes.append(push)
    assert choose_source(17, _settings(ratio), data, sources, design) == chosen[17]  # a function of (seed, i)
    assert len(set(chosen)) >= 6  # a draw among the matching sources, not always the nearest one
    rounds = [choose_source(i, _settings(None), data, sources, design) for i in range(200)]
    spread = lambda p: np.percentile(np.abs(np.log(p)), 90)  # noqa: E731
    assert spread(pushes) < spread(
        [design.target("lv_volume", 0, i) / data.lv[s] for i, s in enumerate(rounds)]
    )


@pytest.mark.parametrize(
    ("ratio", "design"), [(None, LV_DESIGN), (1.5, {}), (1.5, {"age": {"uniform": {"low": 60, "high": 80}}})]
)
def test_without_an_lv_target_or_a_ratio_every_source_lends_once_per_round(ratio, design):
    from vcm.cohort.sources import choose_source

    data, sources = _Sources(SOURCES_ML), np.arange(100, 100 + len(SOURCES_ML))
    data.lv = np.concatenate([np.zeros(100), data.lv])
    n = len(sources)
    for r in range(3):
        chosen = [
            choose_source(r * n + k, _settings(ratio), data, sources, _design(design)) for k in range(n)
        ]
        assert sorted(chosen) == sources.tolist()


def test_match_lv_ratio_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"'cohort.match_lv_ratio': 0.8 is less than the minimum of 1"):
        validate_config({"cohort": {"match_lv_ratio": 0.8}})


# --- steering ----------------------------------------------------------------------------------------------


def phantom() -> np.ndarray:
    """A 4 mm head phantom: CSF shell, cortex, white matter, two lateral ventricles, a deep grey nucleus."""
    shape = (40, 48, 40)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    lab = np.zeros(shape, np.uint16)
    lab[r < 0.85] = 24
    lab[r < 0.78] = np.where(x[r < 0.78] < 0, 3, 42)
    lab[r < 0.62] = np.where(x[r < 0.62] < 0, 2, 41)
    lv = (np.abs(x) - 0.15) ** 2 / 0.006 + y**2 / 0.12 + (z - 0.1) ** 2 / 0.01 < 1
    lab[lv] = np.where(x[lv] < 0, 4, 43)
    lab[(np.abs(x) - 0.2) ** 2 + y**2 + (z + 0.25) ** 2 < 0.01] = 10
    return lab


@pytest.mark.parametrize("factor", [0.6, 1.8, 3.0])
def test_steering_reaches_the_lv_target_and_pushes_tissue_smoothly(factor):
    lab = phantom()
    lv0, brain0 = mask_of(lab, (4, 43)).sum(), brain_mask(lab).sum()
    out = steer_label(lab, (4, 43), 4.0, lv_voxels=lv0 * factor)
    assert mask_of(out.label, (4, 43)).sum() / (lv0 * factor) == pytest.approx(1.0, abs=0.05)
    assert set(np.unique(out.label)) <= set(np.unique(lab))  # nearest neighbour: no new labels
    assert abs(brain_mask(out.label).sum() / brain0 - 1) < 0.03  # a ventricle push, not a head scale
    assert (out.label[lab == 0] == 0).all()  # nothing moves far from the ventricles
    jac = np.stack([np.stack(np.gradient(out.displacement[c])) for c in range(3)])  # d u_c / d x_k
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)) + np.eye(3))
    assert det.min() > 0  # a diffeomorphism: the tissue is displaced, never folded


def test_steering_scales_the_head_to_a_brain_target_then_the_lv():
    lab = phantom()
    lv0, brain0 = mask_of(lab, (4, 43)).sum(), brain_mask(lab).sum()
    out = steer_label(lab, (4, 43), 4.0, lv_voxels=lv0 * 1.5, brain_voxels=brain0 * 0.85)
    assert brain_mask(out.label).sum() / (brain0 * 0.85) == pytest.approx(1.0, abs=0.05)
    assert mask_of(out.label, (4, 43)).sum() / (lv0 * 1.5) == pytest.approx(1.0, abs=0.05)


def test_covariate_order_is_the_backbones():
    assert COVARIATES == ("sex", "age", "lv_volume", "brain_volume")
