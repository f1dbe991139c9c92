import pytest
import yaml

from vcm.config import ConfigError, coerce_overrides, load_config, validate_config


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
        ({"cohort": {"sampler": "euler"}}, "config key 'cohort.sampler': 'euler' is not one of"),
        ({"evaluation": {"sampler": "dpm"}}, "config key 'evaluation.sampler': 'dpm' is not one of"),
        ({"segmentaton": {}}, "config: unknown key 'segmentaton' under top level"),
        ({"registration": {"transfrom": "SyN"}}, "config: unknown key 'transfrom' under 'registration'"),
        ({"grid": "huge"}, "config key 'grid': expected 'demo', 'brainldm' or"),
        ({"cohort": {"sets": ["nope"]}}, "config key 'cohort.sets': 'nope' is not a condition set"),
        (
            {"data": {"gates": {"lv_ml": [300, 1]}}},
            "config key 'data.gates.lv_ml': low end 300 is above high end 1",
        ),
        ({"data": {"gates": {"brain_ml": [600]}}}, "config key 'data.gates.brain_ml': [600] is"),
        (  # the old single switch: say what replaced it
            {"training": {"method": "controlnet"}},
            "config key 'training.method' was replaced: use 'training.methods', a list: methods: [controlnet]",
        ),
        (
            {"training": {"methods": ["vcm", "vcm"]}},
            "config key 'training.methods': ['vcm', 'vcm'] has non-unique",
        ),
        ({"training": {"methods": []}}, "config key 'training.methods': [] should be non-empty"),
        ({"training": {"methods": ["gan"]}}, "config key 'training.methods.0': 'gan' is not one of"),
        (
            {"cohort": {"method": "controlnet"}},
            "config key 'cohort.method': 'controlnet' is not trained (training.methods: vcm)",
        ),
        (
            {"training": {"by_method": {"controlnet": {"stepz": 600}}}},
            "config: unknown key 'stepz' under 'training.by_method.controlnet' (allowed: steps,",
        ),
        (  # the run's or already per method: not a method's to set apart
            {"training": {"by_method": {"vcm": {"sizes": [4]}}}},
            "config: unknown key 'sizes' under 'training.by_method.vcm'",
        ),
        (
            {"training": {"by_method": {"controlnet": {"steps": 0}}}},
            "config key 'training.by_method.controlnet.steps': 0 is less than the minimum of 1",
        ),
        (
            {"training": {"by_method": {"gan": {}}}},
            "config: unknown key 'gan' under 'training.by_method' (allowed: controlnet, vcm)",
        ),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        validate_config(override)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_methods_default_to_vcm_and_the_cohort_samples_the_first():
    cfg = validate_config({})
    assert cfg["training"]["methods"] == ["vcm"] and cfg["cohort"]["method"] is None
    both = validate_config({"training": {"methods": ["controlnet", "vcm"]}, "cohort": {"method": "vcm"}})
    assert both["training"]["methods"] == ["controlnet", "vcm"] and both["cohort"]["method"] == "vcm"


def test_training_settings_take_the_method_of_their_job():
    from vcm.training.settings import Settings

    cfg = validate_config({"training": {"methods": ["controlnet", "vcm"]}})
    assert Settings.from_config(cfg).method == "controlnet"  # the first, where no job names one
    assert Settings.from_config(cfg, method="vcm").method == "vcm"


def test_a_method_trains_with_its_own_settings_over_the_sections():
    from vcm.training.settings import Settings

    cfg = validate_config(
        {
            "training": {
                "methods": ["vcm", "controlnet"],
                "steps": 1800,
                "lr": 8e-4,
                "by_method": {"controlnet": {"steps": 600, "ema_decay": 0.99}},
            }
        }
    )
    vcm, controlnet = (Settings.from_config(cfg, method=m) for m in ("vcm", "controlnet"))
    assert (vcm.steps, vcm.ema_decay, vcm.lr) == (1800, None, 8e-4)
    assert (controlnet.steps, controlnet.ema_decay, controlnet.lr) == (600, 0.99, 8e-4)
    assert Settings.from_config(cfg, method="controlnet", steps=5).steps == 5  # the command line wins


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


# --- command-line overrides: Snakemake's --config reads nested scalars as strings ------------------------------


def test_overrides_are_typed_where_the_schema_takes_no_string():
    # what `snakemake --config 'cohort={size: 4, shard_size: 2}' ...` hands the Snakefile (YAML's BaseLoader)
    overrides = {
        "cohort": {"size": "4", "shard_size": "2", "sets": ["lv"]},
        "training": {"steps": "10", "lr": "1e-3", "sizes": ["4", "8"], "minutes": "null", "flip": "false"},
        "backbone": {"retrain": "true", "scale_factor": "null", "bundle": "2024"},
        "evaluation": {"segmentation": "null", "medicalnet_weights": "null"},
        "data": {"manifest": "2024.csv"},
        "grid": {"shape": ["32", "48", "32"], "spacing_mm": "4"},
        "condition_sets": {"lv": [["lv"]]},
        "results": "my results",
    }
    typed = coerce_overrides(overrides)
    assert typed["cohort"] == {"size": 4, "shard_size": 2, "sets": ["lv"]}
    assert typed["training"] == {"steps": 10, "lr": 1e-3, "sizes": [4, 8], "minutes": None, "flip": False}
    assert typed["backbone"] == {
        "retrain": True,
        "scale_factor": None,
        "bundle": "2024",
    }  # a path stays a string
    assert typed["evaluation"] == {
        "segmentation": None,
        "medicalnet_weights": None,
    }  # enum and ["null", string]
    assert typed["data"] == {"manifest": "2024.csv"}
    assert typed["grid"] == {"shape": [32, 48, 32], "spacing_mm": 4}  # the mapping alternative of a oneOf
    assert typed["condition_sets"] == {"lv": [["lv"]]}
    assert typed["results"] == "my results"
    assert overrides["cohort"]["size"] == "4"  # a copy
    validate_config(typed)


def test_overrides_without_a_schema_are_read_as_yaml():
    # training.vcm holds free keyword arguments; an unknown key is left for validate_config to name
    typed = coerce_overrides({"training": {"vcm": {"unet_channels": ["16", "32"]}}, "cohrt": {"size": "4"}})
    assert typed == {"training": {"vcm": {"unet_channels": [16, 32]}}, "cohrt": {"size": 4}}
    with pytest.raises(ConfigError, match="unknown key 'cohrt'"):
        validate_config(typed)


def test_typed_values_from_the_command_line_pass_unchanged():
    # Snakemake types a top-level value itself (int, float, bool)
    assert coerce_overrides({"grid": "brainldm", "cohort": {"size": 4}}) == {
        "grid": "brainldm",
        "cohort": {"size": 4},
    }
    assert coerce_overrides({}) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"cohort": 4},
            "config key 'cohort' is a section, got 4: override its keys, e.g. --config 'cohort={size: 32}'",
        ),
        ({"cohort": None}, "config key 'cohort' is a section, got None"),
        # not valid YAML: Snakemake passes the text on
        ({"cohort": "{size: 4"}, "config key 'cohort' is a section, got '{size: 4'"),
        (
            {"qc": {"privacy": "off"}},
            "config key 'qc.privacy' is a section, got 'off': override its keys, "
            "e.g. --config 'qc={privacy: {enabled: true}}'",
        ),
        # YAML reads `{size:4}` as the key 'size:4' with no value
        (
            {"cohort": {"size:4": ""}},
            "config key 'cohort.size:4': YAML needs a space after the colon, e.g. --config 'cohort={size: 4}'",
        ),
    ],
)
def test_overrides_that_cannot_work_say_how_to_write_them(overrides, message):
    with pytest.raises(ConfigError) as err:
        coerce_overrides(overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


# --- settings read the validated config; their field defaults are the schema's ------------------------------


def _settings_classes():
    from vcm.evaluation.settings import EvalSettings
    from vcm.prep.gates import GateSettings
    from vcm.privacy import PrivacySettings
    from vcm.qc import QCSettings
    from vcm.train_segmenter import SegmenterSettings
    from vcm.training.settings import Settings
    from vcm.tstr import TstrSettings

    preview = {
        "preview_subjects": "preview.subjects",
        "preview_sampler": "preview.sampler",
        "preview_steps": "preview.steps",
    }
    return [
        (EvalSettings, "evaluation", {}),
        (TstrSettings, "tstr", {}),
        (SegmenterSettings, "qc.segmenter", {}),
        (QCSettings, "qc", {}),
        (PrivacySettings, "qc.privacy", {}),
        (GateSettings, "data.gates", {}),
        (Settings, "training", {**preview, "preview_seed": "preview.seed", "method": "methods.0"}),
    ]


def _at(node, path):
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
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
        if expected is not None:  # None defers to another key (cohort.steps, qc.backend, ...)
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
