"""Intake settings: the documented config section matches the code, values are validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vcm.errors import StageError
from vcm.intake import DEFAULTS, parse_sex, resolve_settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "intake_config.yaml"


def test_documented_section_matches_defaults() -> None:
    section = yaml.safe_load(DOC.read_text())["intake"]
    assert section == DEFAULTS


def test_resolve_settings() -> None:
    settings = resolve_settings(
        {"root": "r", "diagnosis": "CN", "sex_codes": {1: "m"}}, {"visit": "m12", "out": None}
    )
    assert settings["diagnosis"] == ["CN"] and settings["sex_codes"] == {"1": "M"}
    assert settings["visit"] == "m12" and settings["out"] == DEFAULTS["out"]  # a None flag does not override
    assert resolve_settings({"root": "r", "diagnosis": None})["diagnosis"] == []
    assert resolve_settings({"root": "r"}, {"diagnosis": ["any"]})["diagnosis"] == []
    with pytest.raises(StageError, match="intake.root: not set"):
        resolve_settings({})
    with pytest.raises(StageError, match="intake.series_pattern: bad regular expression"):
        resolve_settings({"root": "r", "series_pattern": "mprage("})
    with pytest.raises(StageError, match="intake.sex_codes"):
        resolve_settings({"root": "r", "sex_codes": {"1": "X"}})
    with pytest.raises(StageError, match="intake.source"):
        resolve_settings({"root": "r", "source": "oasis"})


def test_parse_sex() -> None:
    codes = {"0": "F", "1": "M"}
    assert [parse_sex(v, codes) for v in ("Male", "female", " F", "m", "0", "1")] == [
        "M",
        "F",
        "F",
        "M",
        "F",
        "M",
    ]
    assert [parse_sex(v, codes) for v in ("", None, float("nan"), "2", "other")] == [None] * 5
