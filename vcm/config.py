"""The configuration: loading, schema validation with one-line errors, defaults, grid presets.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single source of truth; the Snakefile
and every ``python -m vcm`` stage validate against it through :func:`validate_config`.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from vcm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        node: Any = root
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return {**node, **{k: v for k, v in schema.items() if k != "$ref"}}  # keep a local default
    return schema


def _fill_defaults(cfg: dict[str, Any], schema: dict[str, Any], root: dict[str, Any]) -> None:
    """Insert schema defaults for absent keys, recursively (objects given as defaults are filled too)."""
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in cfg and "default" in sub:
            cfg[key] = copy.deepcopy(sub["default"])
        if isinstance(cfg.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(cfg[key], sub, root)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {}))) or "none"
        where = "top level" if key == "<top level>" else f"'{key}'"
        return f"config: unknown key '{extra[0]}' under {where} (allowed: {allowed})"
    if error.validator == "oneOf" and key == "grid":
        return f"config key 'grid': expected 'demo', 'brainldm' or {{shape: [x, y, z], spacing_mm: s}}, got {error.instance!r}"
    return f"config key '{key}': {error.message}"


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a config dict and return a copy with defaults filled in.

    Raises:
        ConfigError: one line naming the offending key and what was expected.
    """
    schema = load_schema()
    out = copy.deepcopy(cfg) if cfg else {}
    if not isinstance(out, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    _fill_defaults(out, schema, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(out), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_describe(best))
    for name in out["cohort"]["sets"]:
        if name not in out["condition_sets"]:
            raise ConfigError(
                f"config key 'cohort.sets': '{name}' is not a condition set (defined: {', '.join(out['condition_sets'])})"
            )
    return out


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read, validate and default a YAML config file (the project's ``config/config.yaml`` by default)."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return validate_config(raw)


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def section_values(
    cfg: Mapping[str, Any],
    section: str,
    fields: Collection[str],
    overrides: Mapping[str, Any] | None = None,
    *,
    read_elsewhere: Collection[str] = (),
) -> dict[str, Any]:
    """The values of a validated config's ``section`` for a settings dataclass, with ``overrides`` on top.

    One policy for unknown keys: the schema rejects them when the config is validated (:func:`validate_config`
    raises a :class:`~vcm.errors.ConfigError` naming the key), and fills in every default. So the section of a
    validated config holds exactly the dataclass's ``fields`` (and the keys ``read_elsewhere``, which other
    settings read); anything else means that the schema and the dataclass disagree, or that the config was
    not validated: a programming error, not a user's.

    Args:
        cfg: the validated config.
        section: a dotted path to the section (``tstr``, ``qc.segmenter``).
        fields: the dataclass's fields that the section holds.
        overrides: values that win over the config's (command-line options); ``None`` values are ignored.
        read_elsewhere: keys of the section that are not these settings' (sub-sections, keys of other stages).

    Raises:
        TypeError: the section lacks a field or holds a key that is not one.
    """
    node: Any = cfg
    for part in section.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        raise TypeError(
            f"config section '{section}' is missing: validate the config (vcm.config.validate_config)"
        )
    keys = set(node) - set(read_elsewhere)
    missing, extra = sorted(set(fields) - keys), sorted(keys - set(fields))
    if missing:
        raise TypeError(
            f"config key '{section}.{missing[0]}' is missing: validate the config (vcm.config.validate_config), "
            "which fills in the schema's defaults"
        )
    if extra:
        raise TypeError(f"config key '{section}.{extra[0]}' is in the schema but not a field of its settings")
    values = {k: node[k] for k in fields}
    return {**values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
