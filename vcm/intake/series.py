"""ADNI series descriptions: which series are T1 acquisitions the intake may take, and in which order.

An ADNI download holds, next to the T1 acquisition (``MPRAGE``, ``IR-SPGR``, ...), series that match a T1
pattern but must not be taken as one: reformats of the T1 into another plane (``MPRAGE_MPR_Cor``),
post-contrast T1s (``Axial_T1_Post``) and the archive's preprocessed versions of the T1
(``MPR__GradWarp__B1_Correction__N3__Scaled``, which sorts before ``MPRAGE`` by name). This module holds
the decisions on series descriptions, so that each one can say *why* a series was not taken:

* :func:`why_not_t1`: why a series is not a T1 candidate at all (``series_pattern``, ``series_exclude``,
  ``series_reformat``, ``series_contrast``), or None;
* :func:`candidate_key`: the order in which the T1 series of one day are tried (``series_preference``:
  raw before preprocessed by default, originals before repeats, then by name);
* :func:`why_passed_over`: why a same-day candidate was not taken once another one was.

All patterns are case-insensitive regular expressions searched anywhere in the description; an empty
pattern switches its check off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vcm.intake import natural_key

__all__ = ["candidate_key", "is_preprocessed", "why_not_t1", "why_passed_over"]

# (settings key, why) in the order checked: the first that applies names the reason.
_EXCLUSIONS = (
    ("series_exclude", "excluded (series_exclude)"),
    ("series_reformat", "reformat (series_reformat)"),
    ("series_contrast", "post-contrast (series_contrast)"),
)


def _search(pattern: str | None, description: str) -> bool:
    return bool(pattern) and re.search(pattern, description, re.IGNORECASE) is not None


def why_not_t1(description: str, settings: Mapping[str, Any]) -> str | None:
    """Why a series is not a T1 candidate, or None if it is one.

    Args:
        description: the series description (the archive's folder name, spaces replaced by ``_``).
        settings: the resolved intake settings.
    """
    pattern = settings["series_pattern"]
    if pattern and not _search(pattern, description):
        return "not a T1 (series_pattern)"
    for key, why in _EXCLUSIONS:
        if _search(settings.get(key), description):
            return why
    return None


def is_preprocessed(description: str, settings: Mapping[str, Any]) -> bool:
    """Whether a series is one of the archive's preprocessed versions (``series_preprocessed``)."""
    return _search(settings.get("series_preprocessed"), description)


def _kind(description: str, settings: Mapping[str, Any]) -> str:
    return "preprocessed" if is_preprocessed(description, settings) else "raw"


def _is_repeat(description: str) -> bool:
    return "repeat" in description.lower()


def candidate_key(description: str, settings: Mapping[str, Any]) -> tuple:
    """Sort key of the T1 series of one day: the preferred kind, then originals before repeats, then name.

    ``series_preference`` ``raw`` (default) puts raw series before preprocessed ones, ``preprocessed`` the
    reverse, ``any`` orders by name only. The other kind is still tried when the preferred one fails or is
    missing, and the report says so.
    """
    preference = settings.get("series_preference") or "raw"
    rank = 0 if preference == "any" or _kind(description, settings) == preference else 1
    return rank, _is_repeat(description), natural_key(description)


def why_passed_over(description: str, chosen: str, settings: Mapping[str, Any]) -> str:
    """Why a same-day T1 series was not taken, given that ``chosen`` was (and ordered before it)."""
    kind, chosen_kind = _kind(description, settings), _kind(chosen, settings)
    preference = settings.get("series_preference") or "raw"
    if kind != chosen_kind and preference != "any":
        return f"{kind}, {preference} preferred (series_preference)"
    if _is_repeat(description) and not _is_repeat(chosen):
        return "repeat, the original was taken"
    return f"same day, ordered after {chosen}"
