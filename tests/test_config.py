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
