"""The configuration: loading, schema validation with one-line errors, defaults, grid presets.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single source of truth; the Snakefile
and every ``python -m vcm`` stage validate against it through :func:`validate_config`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from vcm.errors import ConfigError, StageError

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
    cfg: dict[str, Any], section: str, known: set[str], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The keys of ``cfg[section]`` for a stage's settings dataclass whose fields are ``known``, with the
    ``overrides`` that are not ``None`` on top.

    Raises:
        StageError: one line naming a key of the section that is not a field.
    """
    section_cfg = dict(cfg.get(section) or {})
    unknown = sorted(set(section_cfg) - known)
    if unknown:
        raise StageError(
            f"config: unknown key '{unknown[0]}' under '{section}' (allowed: {', '.join(sorted(known))})"
        )
    return {**section_cfg, **{k: v for k, v in overrides.items() if v is not None}}
