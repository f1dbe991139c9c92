"""The cohort's design (``cohort.design``): the covariates a synthetic cohort should have, drawn per subject.

Per covariate (``age``, ``sex``, ``lv_volume``, ``brain_volume``) a target: ``source`` (the condition source's
value, as the real data), a distribution (``{normal: {mean, sd}}``, ``{uniform: {low, high}}``,
``{lognormal: {median, sigma}}``; ``{bernoulli: p}``, the probability of male, for sex) or per-subject values
from a CSV (``{csv: path, column: name}``; a ``subject_index`` column, else row order). Volumes are in mL in the
config and the CSV, mm³ everywhere else (the covariates' unit). A named ``preset`` (:data:`PRESETS`: ``cn``,
``mci``, ``ad``) gives age, sex and LV-volume distributions; keys set beside it win. Every draw is clipped to
the backbone's covariate ranges (``conditions.covariate_ranges``).

Subject ``i``'s target for covariate ``k`` comes from its own random stream, ``(cohort.seed, STREAM_DESIGN, i,
k)`` (:func:`vcm.cohort.plan.design_rng`), so it depends neither on the shard size nor on the other covariates'
targets. The schema checks each target's shape; :meth:`Design.from_config` reads the CSV files once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vcm.cohort.plan import design_rng
from vcm.errors import ConfigError, StageError

__all__ = ["COVARIATES", "PRESETS", "Design"]

COVARIATES = ("sex", "age", "lv_volume", "brain_volume")
VOLUMES = ("lv_volume", "brain_volume")
ML = 1000.0  # mm³ per mL

# Study make-ups after ADNI-1's baseline groups. Approximate: see config/README.md, "cohort.design presets",
# for the sources and how the figures were converted (mean/SD of a group to a log-normal's median and sigma).
PRESETS: dict[str, dict[str, Any]] = {
    "cn": {
        "age": {"normal": {"mean": 75.8, "sd": 5.0}},
        "sex": {"bernoulli": 0.52},
        "lv_volume": {"lognormal": {"median": 30.0, "sigma": 0.45}},
    },
    "mci": {
        "age": {"normal": {"mean": 74.7, "sd": 7.4}},
        "sex": {"bernoulli": 0.65},
        "lv_volume": {"lognormal": {"median": 38.0, "sigma": 0.45}},
    },
    "ad": {
        "age": {"normal": {"mean": 75.3, "sd": 7.5}},
        "sex": {"bernoulli": 0.53},
        "lv_volume": {"lognormal": {"median": 48.0, "sigma": 0.42}},
    },
}


@dataclass
class Design:
    """The resolved design: one target per covariate (``source`` where none is set) and the clipping ranges.

    Attributes:
        targets: covariate -> ``"source"`` or a one-key mapping (``normal``, ``uniform``, ``lognormal``,
            ``bernoulli``, ``csv``).
        ranges: covariate -> (low, high) in covariate units (sex 0/1, years, mm³).
        tables: covariate -> per-subject values read from its CSV (covariate units), by subject index.
        files_sha256: the CSV files' checksums (part of the subjects' settings signature).
    """

    targets: dict[str, Any]
    ranges: dict[str, tuple[float, float]]
    tables: dict[str, dict[int, float]] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Design:
        """The design of a validated config (``cohort.design``, ``conditions.covariate_ranges``).

        Raises:
            ConfigError: an unknown preset, a distribution whose parameters make no sense (``low > high``).
            StageError: a CSV file that is missing, lacks the column or holds a value that is not a number.
        """
        from vcm.cohort.sources import ranges_path
        from vcm.prep.conditions import load_ranges

        section = dict((cfg.get("cohort") or {}).get("design") or {})
        preset = section.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(
                f"config key 'cohort.design.preset': unknown preset {preset!r} ({', '.join(PRESETS)})"
            )
        targets = {k: "source" for k in COVARIATES}
        targets.update(PRESETS.get(preset, {}) if preset else {})
        targets.update({k: v for k, v in section.items() if k in COVARIATES and v is not None})
        ranges = load_ranges(ranges_path(cfg["conditions"]["covariate_ranges"]))
        design = cls(targets, ranges)
        for key, target in targets.items():
            _check_target(key, target)
            if isinstance(target, Mapping) and "csv" in target:
                design.tables[key], design.files_sha256[key] = _read_csv(key, target)
        return design

    def designed(self, key: str) -> bool:
        """Whether covariate ``key`` has a target of its own (not the source's value)."""
        return self.targets[key] != "source"

    @property
    def any(self) -> bool:
        return any(self.designed(k) for k in COVARIATES)

    def signature(self) -> dict[str, Any]:
        """What the targets depend on: the resolved targets and the CSV files' contents."""
        return {"targets": self.targets, "files": self.files_sha256}

    def draw(self, seed: int, index: int, source: Mapping[str, float]) -> dict[str, float]:
        """Subject ``index``'s target per covariate (covariate units), the source's value where ``source``.

        Args:
            seed: ``cohort.seed``.
            index: the subject's global index.
            source: the condition source's values (after a new anatomy's warp), by covariate.
        """
        out = {}
        for key in COVARIATES:
            value = self.target(key, seed, index)
            out[key] = float(source[key]) if value is None else value
        return out

    def target(self, key: str, seed: int, index: int) -> float | None:
        """Subject ``index``'s own target for covariate ``key`` (clipped, covariate units); ``None`` where the
        design gives it the source's value. It does not depend on the source, which may be chosen by it."""
        target = self.targets[key]
        if target == "source":
            return None
        if "csv" in target:
            if index not in self.tables[key]:
                raise StageError(
                    f"{target['csv']}: no row for subject_index {index} (cohort.design.{key}; "
                    f"the file has {len(self.tables[key])} rows)"
                )
            value = self.tables[key][index]
        else:
            value = _sample(key, target, design_rng(seed, index, COVARIATES.index(key)))
        low, high = self.ranges[key]
        return float(np.clip(value, low, high))


def _check_target(key: str, target: Any) -> None:
    """One-line errors for what the schema cannot say: the distribution fits its covariate."""
    if target == "source":
        return
    name = next(iter(target))
    where = f"config key 'cohort.design.{key}'"
    if name == "bernoulli" and key != "sex":
        raise ConfigError(f"{where}: bernoulli is for sex only")
    if key == "sex" and name not in ("bernoulli", "csv"):
        raise ConfigError(f"{where}: sex takes source, {{bernoulli: p}} or {{csv: file}}, got {name}")
    if name == "uniform" and target[name]["low"] > target[name]["high"]:
        raise ConfigError(f"{where}: uniform low {target[name]['low']} > high {target[name]['high']}")


def _sample(key: str, target: Mapping[str, Any], rng: np.random.Generator) -> float:
    """One draw of a distribution, in covariate units (volumes: the config's mL times 1000)."""
    name, p = next(iter(target.items()))
    unit = ML if key in VOLUMES else 1.0
    if name == "normal":
        return unit * float(rng.normal(p["mean"], p["sd"]))
    if name == "uniform":
        return unit * float(rng.uniform(p["low"], p["high"]))
    if name == "lognormal":
        return unit * float(np.exp(rng.normal(math.log(p["median"]), p["sigma"])))
    if name == "bernoulli":
        return float(rng.random() < float(p))
    raise ConfigError(f"config key 'cohort.design.{key}': unknown target {name!r}")


def _read_csv(key: str, target: Mapping[str, Any]) -> tuple[dict[int, float], str]:
    """Per-subject values of a CSV target (covariate units) by subject index, and the file's sha256."""
    import pandas as pd

    from vcm.config import REPO_ROOT

    path = Path(target["csv"])
    path = path if path.is_absolute() or path.is_file() else REPO_ROOT / path
    column = target.get("column") or key
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: cannot read the design CSV of cohort.design.{key} ({err})") from None
    if column not in table.columns:
        raise StageError(
            f"{path}: no column {column!r} for cohort.design.{key} (has {', '.join(table.columns)})"
        )
    values = pd.to_numeric(table[column], errors="coerce")
    bad = values.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise StageError(
            f"{path}: column {column!r} row {row + 1}: {table[column].iloc[row]!r} is not a number"
        )
    if "subject_index" in table.columns:
        index = pd.to_numeric(table["subject_index"], errors="coerce")
        if index.isna().any() or (index < 0).any() or index.duplicated().any():
            raise StageError(f"{path}: column 'subject_index' must hold distinct integers >= 0")
        keys = index.astype(int).tolist()
    else:
        keys = list(range(len(table)))
    unit = ML if key in VOLUMES else 1.0
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {int(i): unit * float(v) for i, v in zip(keys, values, strict=True)}, sha
