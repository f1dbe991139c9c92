"""The configuration: loading, schema validation with one-line errors, defaults, command-line overrides.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single source of truth; the Snakefile
and every ``python -m vcm`` stage validate against it through :func:`validate_config`. The Snakefile first
types the ``snakemake --config`` overrides by the same schema (:func:`coerce_overrides`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from vcm.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "SCHEMA_PATH",
    "ConfigError",
    "coerce_overrides",
    "dump_config",
    "load_config",
    "load_schema",
    "section_values",
    "validate_config",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


@functools.cache
def load_schema() -> dict[str, Any]:
    """The config schema, read once per process (the Snakefile types overrides and validates with it): one
    shared dict, not to be modified."""
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


# Keys that a release replaced: (section, old key) -> what to write instead. An old config then stops with this
# line rather than the schema's generic "unknown key".
_REPLACED = {
    (
        "training",
        "method",
    ): "use 'training.methods', a list: methods: [{value}] (or [vcm, controlnet] for both)",
}


def _check_replaced(cfg: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` naming a replaced key and its successor (see ``_REPLACED``)."""
    for (section, key), advice in _REPLACED.items():
        node = cfg.get(section)
        if isinstance(node, Mapping) and key in node:
            raise ConfigError(f"config key '{section}.{key}' was replaced: {advice.format(value=node[key])}")


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a config dict and return a copy with defaults filled in.

    Raises:
        ConfigError: one line naming the offending key and what was expected.
    """
    schema = load_schema()
    out = copy.deepcopy(cfg) if cfg else {}
    if not isinstance(out, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    _check_replaced(out)
    _fill_defaults(out, schema, schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(out), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_describe(best))
    for key, value in out["data"]["gates"].items():  # the schema cannot order a [low, high] pair
        if isinstance(value, list) and value[0] > value[1]:
            raise ConfigError(
                f"config key 'data.gates.{key}': low end {value[0]:g} is above high end {value[1]:g}"
            )
    _check_by_method(out, schema)
    method, methods = out["cohort"]["method"], out["training"]["methods"]
    if method is not None and method not in methods:
        raise ConfigError(
            f"config key 'cohort.method': '{method}' is not trained (training.methods: {', '.join(methods)})"
        )
    for name in out["cohort"]["sets"]:
        if name not in out["condition_sets"]:
            raise ConfigError(
                f"config key 'cohort.sets': '{name}' is not a condition set (defined: {', '.join(out['condition_sets'])})"
            )
    return out


# training keys that one method cannot set apart (training.by_method): they are the run's or per method already
_SHARED_TRAINING_KEYS = ("methods", "sizes", "by_method", "vcm", "controlnet", "preview")


def _check_by_method(cfg: Mapping[str, Any], schema: dict[str, Any]) -> None:
    """Validate each ``training.by_method.<method>`` block as the training section it makes: its keys must be
    training keys a method can set apart, and the merged section must pass the schema."""
    training = schema["properties"]["training"]
    for method, extra in cfg["training"]["by_method"].items():
        where = f"training.by_method.{method}"
        for key in extra:
            if key not in training["properties"] or key in _SHARED_TRAINING_KEYS:
                allowed = ", ".join(k for k in training["properties"] if k not in _SHARED_TRAINING_KEYS)
                raise ConfigError(f"config: unknown key '{key}' under '{where}' (allowed: {allowed})")
        merged = {**cfg["training"], **extra}
        validator = jsonschema.Draft7Validator({"definitions": schema.get("definitions", {}), **training})
        error = jsonschema.exceptions.best_match(validator.iter_errors(merged))
        if error is not None:
            key = ".".join(str(p) for p in error.absolute_path)
            raise ConfigError(f"config key '{where}.{key}': {error.message}")


def coerce_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line overrides (``snakemake --config``) typed as if they were written in the config file.

    Snakemake reads each ``--config key=value`` with ``int``, ``float``, a boolean parser and then YAML's
    ``BaseLoader``, which reads every scalar inside a mapping or a list as a string: ``'cohort={size: 4}'``
    arrives as ``{"cohort": {"size": "4"}}``, deep-merged over the config file (the other ``cohort`` keys stay).
    Here every string leaf is read again with ``yaml.safe_load`` where the schema takes what YAML reads
    (``"4"`` becomes ``4``, ``"true"`` ``True``, ``"null"`` ``None``; a number that YAML 1.1 leaves a string,
    as ``1e-3``, becomes a float where the schema takes a number), and stays the text where the schema takes
    a string instead (``data={manifest: 2024}`` keeps ``"2024"``); keys without a schema get YAML's types.
    Merging the result over the config with the same deep merge replaces the string leaves with typed ones;
    :func:`validate_config` checks the rest.

    Args:
        overrides: the parsed ``--config`` entries (Snakemake's ``workflow.config_settings.config``).

    Returns:
        A typed copy of ``overrides``.

    Raises:
        ConfigError: an override that cannot work as given, in one line naming the key with an example that
            works: a section given a value instead of keys (``cohort=4``, or a mapping that is not valid YAML),
            or a key written without a space after its colon (``cohort={size:4}`` is YAML's key ``size:4``).
    """
    schema = load_schema()
    # an unknown top-level key has no schema (plain YAML typing): validate_config names it
    return {key: _coerce(value, [_child(schema, key)], schema, (key,)) for key, value in overrides.items()}


# The JSON types of what yaml.safe_load reads (an int is also a number).
_JSON_TYPES = {
    type(None): {"null"},
    bool: {"boolean"},
    int: {"integer", "number"},
    float: {"number"},
    str: {"string"},
    list: {"array"},
    dict: {"object"},
}


def _alternatives(schema: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema, or its ``oneOf``/``anyOf`` alternatives, recursively, with references resolved."""
    schema = _resolve(schema, root)
    nested = [*schema.get("oneOf", []), *schema.get("anyOf", [])]
    return [alt for sub in nested for alt in _alternatives(sub, root)] if nested else [schema]


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


def _coerce(
    value: Any, schemas: list[dict[str, Any] | None], root: dict[str, Any], path: tuple[str, ...]
) -> Any:
    """``value`` typed by the schemas that may hold it (none: plain YAML typing)."""
    alternatives = [alt for sub in schemas if sub is not None for alt in _alternatives(sub, root)]
    given = value
    if isinstance(value, str):
        value = _read_scalar(value, alternatives)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            _check_key(key, alternatives, path)
            out[key] = _coerce(item, [_child(alt, key) for alt in alternatives], root, (*path, str(key)))
        return out
    if isinstance(value, list):
        items = [alt["items"] for alt in alternatives if isinstance(alt.get("items"), dict)]
        return [_coerce(item, items, root, path) for item in value]
    if alternatives and all(_types(alt) == {"object"} for alt in alternatives):
        raise ConfigError(
            f"config key '{'.'.join(path)}' is a section, got {given!r}: override its keys, e.g. "
            f"{_override_example(path, alternatives, root)} (quote the whole entry for the shell)"
        )
    return value


def _accepts(alternative: dict[str, Any], value: Any) -> bool:
    """Whether a schema takes a value of this JSON type (its range and format are validate_config's)."""
    if "enum" in alternative:
        return any(value == item and type(value) is type(item) for item in alternative["enum"])
    kinds = _types(alternative)
    return not kinds or bool(kinds & _JSON_TYPES[type(value)])


def _read_scalar(text: str, alternatives: list[dict[str, Any]]) -> Any:
    """A string leaf as the config file would hold it.

    The text read as YAML where the schema takes what YAML reads (``"4"`` is ``4``, ``"null"`` ``None``), the
    text itself where YAML reads another type but the schema takes a string (``manifest: 2024`` stays
    ``"2024"``), a float where YAML 1.1 leaves a number a string (``1e-3``) but the schema takes one.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) or type(value) not in _JSON_TYPES:  # dates and the like stay text
        if any("number" in _types(alt) for alt in alternatives):
            try:
                return float(text)
            except ValueError:
                pass
        return text
    if not alternatives or any(_accepts(alt, value) for alt in alternatives):
        return value
    return text if any(_accepts(alt, text) for alt in alternatives) else value


def _child(schema: dict[str, Any], key: Any) -> dict[str, Any] | None:
    """The schema of ``key`` in a mapping that ``schema`` describes (``None``: the key has none)."""
    properties = schema.get("properties", {})
    if key in properties:
        return properties[key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _check_key(key: Any, alternatives: list[dict[str, Any]], path: tuple[str, ...]) -> None:
    """``{size:4}`` is YAML's key ``size:4`` with no value: say that the colon needs a space."""
    if not isinstance(key, str) or ":" not in key or any(_child(alt, key) for alt in alternatives):
        return
    name, _, leaf = key.partition(":")
    raise ConfigError(
        f"config key '{'.'.join((*path, key))}': YAML needs a space after the colon, "
        f"e.g. {_example((*path, name.strip()), leaf.strip() or '...')}"
    )


def _override_example(path: tuple[str, ...], alternatives: list[dict[str, Any]], root: dict[str, Any]) -> str:
    """A ``--config`` entry that sets one key of the section at ``path`` (its first with a scalar default)."""
    for alt in alternatives:
        for key, sub in alt.get("properties", {}).items():
            default = _resolve(sub, root).get("default")
            if isinstance(default, (bool, int, float, str)):
                leaf = str(default).lower() if isinstance(default, bool) else str(default)
                return _example((*path, key), leaf)
    return _example((*path, "key"), "value")


def _example(path: tuple[str, ...], leaf: str) -> str:
    """``--config 'top={a: {b: leaf}}'`` for the key at ``path``."""
    text = leaf
    for key in reversed(path[1:]):
        text = f"{{{key}: {text}}}"
    return f"--config '{path[0]}={text}'"


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
