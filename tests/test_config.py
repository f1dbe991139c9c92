import pytest
import yaml

from vcm.config import ConfigError, load_config, validate_config


def test_default_config_is_valid(cfg):
    assert cfg["grid"] == "demo"
    assert cfg["registration"]["transform"] == "Affine"
    # the demo world ships each subject's true labels, so the demo reads them
    assert cfg["segmentation"]["backend"] == "precomputed"
    assert cfg["qc"]["backend"] == "segmenter"


def test_defaults_are_filled_for_absent_sections():
    cfg = validate_config({"grid": "brainldm"})
    assert cfg["conditions"]["covariate_ranges"] == "resources/covariate_ranges.yaml"
    assert cfg["segmentation"]["synthseg"]["command"] == "mri_synthseg"
    assert cfg["training"]["sizes"] == [10, 20]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"registration": {"transform": "Bspline"}},
            "config key 'registration.transform': 'Bspline' is not one of",
        ),
        ({"cohort": {"size": -3}}, "config key 'cohort.size': -3 is less than the minimum of 1"),
        ({"segmentaton": {}}, "config: unknown key 'segmentaton' under top level"),
        ({"registration": {"transfrom": "SyN"}}, "config: unknown key 'transfrom' under 'registration'"),
        ({"grid": "huge"}, "config key 'grid': expected 'demo', 'brainldm' or"),
        ({"cohort": {"sets": ["nope"]}}, "config key 'cohort.sets': 'nope' is not a condition set"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(override)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_grid_mapping_is_accepted():
    cfg = validate_config({"grid": {"shape": [32, 48, 32], "spacing_mm": 5}})
    assert cfg["grid"]["shape"] == [32, 48, 32]


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"grid": "demo", "qc": {"dice_min": 0.8}}))
    assert load_config(good)["qc"]["dice_min"] == 0.8


# --- settings read the validated config; their field defaults are the schema's ------------------------------


def _settings_classes():
    from vcm.evaluation.settings import EvalSettings
    from vcm.privacy import PrivacySettings
    from vcm.qc import QCSettings
    from vcm.train_segmenter import SegmenterSettings
    from vcm.training.settings import Settings
    from vcm.tstr import TstrSettings

    preview = {"preview_subjects": "preview.subjects", "preview_ddim_steps": "preview.ddim_steps"}
    return [
        (EvalSettings, "evaluation", {}),
        (TstrSettings, "tstr", {}),
        (SegmenterSettings, "qc.segmenter", {}),
        (QCSettings, "qc", {}),
        (PrivacySettings, "qc.privacy", {}),
        (Settings, "training", {**preview, "preview_seed": "preview.seed"}),
    ]


def _at(node, path):
    for part in path.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize(
    ("cls", "section", "renamed"), _settings_classes(), ids=lambda x: getattr(x, "__name__", x)
)
def test_settings_defaults_are_the_schema_defaults(cls, section, renamed):
    import dataclasses

    schema_defaults = _at(validate_config({}), section)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        expected = _at(schema_defaults, renamed.get(f.name, f.name))
        assert (list(default) if isinstance(default, tuple) else default) == expected, f"{section}.{f.name}"
    read = cls.from_config(validate_config({}))  # every field read from the config, none re-defaulted
    for f in dataclasses.fields(cls):
        value = getattr(read, f.name)
        expected = _at(schema_defaults, renamed.get(f.name, f.name))
        if expected is not None:  # None defers to another key (cohort.ddim_steps, qc.backend, ...)
            assert (list(value) if isinstance(value, tuple) else value) == expected, f"{section}.{f.name}"


def test_unknown_keys_are_the_schemas_to_reject():
    from vcm.config import section_values
    from vcm.tstr import TstrSettings

    with pytest.raises(ConfigError, match="unknown key 'step' under 'tstr'"):
        validate_config({"tstr": {"step": 3}})
    cfg = validate_config({})
    with pytest.raises(
        TypeError, match=r"config key 'tstr\.augment' is missing: validate the config"
    ):  # a config that skipped validation
        TstrSettings.from_config({**cfg, "tstr": {}})
    with pytest.raises(TypeError, match="'tstr.labels' is in the schema but not a field"):
        section_values(
            cfg, "tstr", ["steps"], read_elsewhere=[k for k in cfg["tstr"] if k not in ("steps", "labels")]
        )
    assert section_values(
        cfg,
        "qc.segmenter",
        ["steps", "lr"],
        {"lr": None, "steps": 5},
        read_elsewhere=set(cfg["qc"]["segmenter"]) - {"steps", "lr"},
    ) == {"steps": 5, "lr": cfg["qc"]["segmenter"]["lr"]}
