"""Write the manifest (subject, t1, age, sex) and <stem>_intake.csv from an ADNI download or a BIDS dataset.

``python -m vcm manifest``. Settings come from the ``intake`` section of ``--config`` (see
docs/intake_config.yaml); each flag overrides its key. Relative paths given are relative to the working
directory; the manifest's ``t1`` paths are written absolute, so the pipeline finds them wherever it reads
the manifest from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vcm.errors import StageError
from vcm.intake import DEFAULTS, SERIES_PREFERENCES, resolve_settings, summary, write_outputs
from vcm.stage import stage_parser

__all__ = ["build_parser", "cli", "load_section"]


def load_section(path: str | Path) -> dict[str, Any]:
    """The ``intake`` section of a YAML config.

    Raises:
        StageError: the file is missing or not YAML, or has no ``intake`` mapping.
    """
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise StageError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise StageError(f"{path}: not valid YAML ({(str(err).splitlines() or [''])[0]})") from None
    if not isinstance(config, dict) or "intake" not in config:
        raise StageError(f"{path}: no 'intake' section")
    section = config["intake"] or {}
    if not isinstance(section, dict):
        raise StageError(f"{path}: 'intake' must be a mapping, got {type(section).__name__}")
    return section


def _sex_codes(text: str) -> dict[str, str]:
    """``1=M,2=F`` -> {"1": "M", "2": "F"}."""
    try:
        return dict(item.split("=", 1) for item in text.split(",") if item.strip())
    except ValueError:
        raise StageError(f"--sex-codes: '{text}' is not CODE=SEX[,CODE=SEX...] (e.g. 1=M,2=F)") from None


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    # --config is optional here: every setting can be given as a flag instead.
    p = stage_parser("manifest", __doc__, config=False)
    p.add_argument("--config", help="YAML config whose 'intake' section gives the settings (flags override)")
    p.add_argument("--source", choices=["adni", "bids"], help=f"input layout (default {d['source']})")
    p.add_argument("--root", help="ADNI download folder (holding <PTID>/ or ADNI/<PTID>/) or BIDS root")
    p.add_argument("--adnimerge", help="ADNIMERGE.csv (default: in or next to --root)")
    p.add_argument(
        "--diagnosis",
        nargs="+",
        metavar="DX",
        help="diagnoses kept (default CN); 'any' keeps every participant",
    )
    p.add_argument(
        "--diagnosis-column", help="ADNIMERGE column (default DX) / participants.tsv column (default none)"
    )
    p.add_argument("--visit", help="ADNI: baseline (earliest scan), latest, or a VISCODE such as m12")
    p.add_argument("--session", help="BIDS: first, last, or a session label such as ses-02")
    p.add_argument(
        "--series-pattern", help=f"ADNI T1 series regex, case-insensitive (default '{d['series_pattern']}')"
    )
    p.add_argument("--series-exclude", help=f"ADNI series excluded (default '{d['series_exclude']}')")
    p.add_argument("--series-reformat", help="ADNI reformats excluded, regex ('' keeps them)")
    p.add_argument("--series-contrast", help="ADNI post-contrast series excluded, regex ('' keeps them)")
    p.add_argument("--series-preprocessed", help="ADNI: regex telling the archive's preprocessed series")
    p.add_argument(
        "--series-preference",
        choices=SERIES_PREFERENCES,
        help=f"ADNI: which of a day's T1 series is tried first (default {d['series_preference']})",
    )
    p.add_argument("--date-tolerance-days", type=float, help="ADNI: max days scan to EXAMDATE (default 180)")
    p.add_argument("--sex-codes", type=_sex_codes, help="numeric sex codes, e.g. 1=M,2=F (default 0=F,1=M)")
    p.add_argument("--dcm2niix", help="dcm2niix executable (default: dcm2niix on PATH)")
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="re-convert DICOM already converted"
    )
    p.add_argument(
        "--out", help=f"manifest CSV (default {d['out']}); the report is <stem>_intake.csv beside it"
    )
    p.add_argument("--nifti-dir", help=f"where converted DICOM series go (default {d['nifti_dir']})")
    return p


def cli(argv: list[str]) -> int:
    """Run the intake; print the count summary; return 0 (raise StageError on an expected failure)."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    section = load_section(config) if config else None
    settings = resolve_settings(section, args)
    if settings["source"] == "adni":
        from vcm.intake.adni import collect
    else:
        from vcm.intake.bids import collect
    outcomes = collect(settings)
    try:
        manifest, report = write_outputs(outcomes, settings["out"])
    finally:
        print(summary(outcomes, settings["source"]))
    print(f"manifest: {manifest}\nreport:   {report}")
    return 0
