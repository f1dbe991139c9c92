"""The workflow keeps the conventions of the Snakemake workflow catalog: pinned conda environments that agree
with pyproject.toml and install vcm, a conda environment, log and benchmark on every job rule, a caption on
every report output, and a clean ``snakemake --lint`` and ``snakefmt --check``. Its command line works as
users type it: nested ``--config`` overrides, and paths with spaces (quoted in every shell command)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflow"
ENVS = WORKFLOW / "envs"
CONDA_TO_PYPI = {"matplotlib-base": "matplotlib", "pytorch": "torch"}
RULE_HEADER = re.compile(r"^(rule|checkpoint) (\w+):$", re.MULTILINE)


def _pins(env_file: Path) -> dict[str, str]:
    pins = {}
    for dep in yaml.safe_load(env_file.read_text())["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-") or item in ("pip",) or item.startswith("python="):
                continue
            name, _, version = item.replace("==", "=").partition("=")
            pins[CONDA_TO_PYPI.get(name, name).lower()] = version
    return pins


def _project_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


def _rules() -> list[tuple[Path, str, str]]:
    """(rule file, rule name, rule text) of every rule and checkpoint of the workflow."""
    out = []
    for path in [WORKFLOW / "Snakefile", *sorted((WORKFLOW / "rules").glob("*.smk"))]:
        text = path.read_text()
        heads = list(RULE_HEADER.finditer(text))
        for head in heads:
            body = text[head.end() :]
            # the rule ends at the next line that is not indented (code, a comment or another rule)
            end = re.search(r"^\S", body, re.MULTILINE)
            out.append((path, head.group(2), body[: end.start()] if end else body))
    return out


def _directive(rule_text: str, name: str) -> str | None:
    """The text of one directive of a rule (what follows ``name:``, up to the next directive)."""
    match = re.search(rf"^    {name}:(.*?)(?=^    \w+:|\Z)", rule_text, re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else None


JOB_RULES = [(path, name, text) for path, name, text in _rules() if _directive(text, "shell")]


@pytest.mark.parametrize("env", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pin_satisfies_the_project_range(env):
    reqs = _project_requirements()
    pins = _pins(env)
    assert pins, env
    for name, version in pins.items():
        assert "*" not in version and version, f"{env.name}: {name} is not pinned"
        if name in reqs:
            assert reqs[name].specifier.contains(version), (
                f"{env.name}: {name}={version} outside {reqs[name]}"
            )


def test_torch_env_covers_every_dependency():
    missing = set(_project_requirements()) - set(_pins(ENVS / "torch.yaml"))
    assert not missing, f"workflow/envs/torch.yaml lacks {sorted(missing)}"


def test_prep_env_covers_what_the_prep_stages_import():
    needed = {
        "numpy",
        "scipy",
        "nibabel",
        "nilearn",
        "antspyx",
        "h5py",
        "pandas",
        "pyyaml",
        "jsonschema",
        "tqdm",
        "matplotlib",
        "scikit-image",
    }
    assert needed <= set(_pins(ENVS / "prep.yaml"))


@pytest.mark.parametrize("env", sorted(ENVS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_env_installs_this_checkouts_vcm(env):
    """The post-deploy script builds vcm without isolation, so the env's setuptools must meet build-system."""
    script = env.with_suffix(".post-deploy.sh")
    assert script.is_file() and not script.is_symlink(), f"{script.name} missing"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "pip install --no-deps --no-build-isolation --editable ." in text
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = _pins(env)
    for req in map(Requirement, build):
        assert req.name in pins and req.specifier.contains(pins[req.name]), f"{env.name}: {req} not pinned"


@pytest.mark.parametrize("rule", JOB_RULES, ids=lambda r: r[1])
def test_every_job_rule_has_a_conda_env_a_log_and_a_benchmark(rule):
    path, name, text = rule
    conda = _directive(text, "conda")
    assert conda, f"rule {name} has no conda env"
    env = path.parent / re.search(r'"([^"]+)"', conda).group(1)
    assert env.resolve().parent == ENVS and env.is_file(), f"rule {name}: {env} is not an env of {ENVS}"
    assert _directive(text, "log"), f"rule {name} has no log"
    benchmark = _directive(text, "benchmark")
    assert benchmark and f"{{RESULTS}}/benchmarks/{name}" in benchmark, f"rule {name}: benchmark {benchmark}"


def test_rules_that_run_no_job_are_local():
    for _, name, text in _rules():
        if not _directive(text, "shell"):
            assert _directive(text, "localrule") == "True", f"rule {name} aggregates: make it a localrule"


def test_prep_env_rules_run_stages_that_need_no_torch():
    """A stage in the prep environment (no torch, no MONAI) must import without them."""
    from vcm.cli import STAGES

    modules = set()
    for _, _, text in JOB_RULES:
        if "prep.yaml" in _directive(text, "conda"):
            stage = re.search(r"python -m vcm ([\w-]+)", _directive(text, "shell")).group(1)
            modules.add(STAGES[stage].partition(":")[0])
    assert modules
    code = (
        "import importlib, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('torch', 'monai'):\n"
        "            raise ImportError(f'{name} is not in workflow/envs/prep.yaml')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "for module in sys.argv[1:]:\n"
        "    importlib.import_module(module)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *sorted(modules)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_report_output_has_a_caption():
    calls = 0
    for path in [WORKFLOW / "Snakefile", *sorted((WORKFLOW / "rules").glob("*.smk"))]:
        text = path.read_text()
        for match in re.finditer(r"\breport\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start() : end + 1]
            caption = re.search(r'caption="([^"]+)"', call)
            assert caption, f"{path.name}: report output without caption: {call}"
            assert (path.parent / caption.group(1)).is_file(), f"{path.name}: {caption.group(1)} missing"
            calls += 1
    assert calls >= 10


def test_catalog_settings_match_the_layout():
    settings = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert settings["software-stack-deployment"]["conda"] is True
    assert settings["report"] is True
    assert (WORKFLOW / "Snakefile").is_file() and not (REPO / "Snakefile").exists()
    assert (REPO / "config" / "README.md").is_file()


def test_workflow_is_snakefmt_formatted():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "workflow"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_snakemake_lint_is_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--config", f"results={tmp_path / 'results'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


# --- shell commands quote every path --------------------------------------------------------------------------

# {params.NAME} placeholders that are no path (numbers, a grid preset name, fixed options), and options built by
# shell_option() (common.smk), which quotes their path: "" when the optional file is not an input.
UNQUOTED_PARAMS = {"demo", "n", "grid", "args"}
OPTION_PARAMS = {"t2", "segmenter", "segmenter_json"}
PATH_PLACEHOLDER = re.compile(r"(?<!\{)\{((input|output|params|log)[^{}:]*)(:[^{}]*)?\}")


@pytest.mark.parametrize("rule", JOB_RULES, ids=lambda r: r[1])
def test_every_path_in_a_shell_command_is_quoted(rule):
    _, name, text = rule
    shell = _directive(text, "shell")
    found = PATH_PLACEHOLDER.findall(shell)
    assert found, f"rule {name}: no input, output or log in {shell}"
    for field, kind, spec in found:
        param = field.split(".")[1].split("[")[0] if kind == "params" else None
        if param in UNQUOTED_PARAMS | OPTION_PARAMS:
            continue
        assert spec.endswith("q"), f"rule {name}: {{{field}{spec}}} is not quoted: write {{{field}:q}}"


def test_optional_path_options_quote_their_path():
    """The params that shell commands take unquoted as options hold their path quoted by shell_option()."""
    rule_files = "\n".join(path.read_text() for path in sorted((WORKFLOW / "rules").glob("*.smk")))
    assigned = dict(re.findall(r"^(\w+) = (.*)$", rule_files, re.MULTILINE))
    seen = set()
    for _, name, text in JOB_RULES:
        params, shell = _directive(text, "params") or "", _directive(text, "shell")
        for match in re.finditer(r"^ {0,8}(\w+)=(.*?)(?=^ {0,8}\w+=|\Z)", params, re.MULTILINE | re.DOTALL):
            param, value = match.group(1), match.group(2).strip().rstrip(",")
            if param in OPTION_PARAMS and f"{{params.{param}}}" in shell:
                seen.add(param)
                value = assigned.get(value, value)  # a global (QC_SEGMENTER_ARG)
                assert "shell_option(" in value, (
                    f"rule {name}: params.{param} = {value} is not shell_option()"
                )
    assert seen == OPTION_PARAMS


def _dry_run(*args: str, cores: int = 1) -> subprocess.CompletedProcess:
    """``snakemake -n`` in the repository: plans the whole workflow (up to the input checkpoint), runs nothing."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", str(cores), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _job_counts(stdout: str) -> dict[str, int]:
    """The dry run's "Job stats" table: jobs per rule."""
    table = stdout.partition("Job stats:")[2].partition("total")[0]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_a_results_folder_with_a_space_plans_with_quoted_paths(tmp_path):
    results = tmp_path / "my results"
    configfile = tmp_path / "study.yaml"
    configfile.write_text(
        yaml.safe_dump({"results": str(results), "data": {"manifest": f"{results}/demo/manifest.csv"}})
    )
    proc = _dry_run("--printshellcmds", "--configfile", str(configfile))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    commands = re.findall(r"^Shell command: (python .*|ITK.*)$", proc.stdout + proc.stderr, re.MULTILINE)
    assert len(commands) >= 10, proc.stdout[-4000:]
    for command in commands:
        words = shlex.split(command)
        assert not any(word.endswith("/my") for word in words), f"a path split at its space: {command}"
        assert any("my results/" in word for word in words), command


def _holds(written, expected):
    """``written`` has every key of ``expected``, nested sections included, with its value."""
    if isinstance(expected, dict):
        return isinstance(written, dict) and all(
            k in written and _holds(written[k], v) for k, v in expected.items()
        )
    return written == expected


def test_nested_config_overrides_merge_into_the_config_file(tmp_path):
    """``--config 'cohort={size: 6, shard_size: 2}'`` sets those two keys, typed, and keeps the others."""
    results = tmp_path / "results"
    proc = _dry_run(
        "--config",
        f"results={results}",
        f"data={{manifest: {results}/demo/manifest.csv}}",
        "cohort={size: 6, shard_size: 2}",
        "training={steps: 10}",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    written = yaml.safe_load((results / ".vcm" / "config.yaml").read_text())  # what every stage reads
    # every key the config file sets, at any depth, is kept (the schema adds its defaults beside them)
    assert _holds(written["cohort"], {**base["cohort"], "size": 6, "shard_size": 2})
    assert written["training"]["steps"] == 10
    assert written["training"]["sizes"] == base["training"]["sizes"]
    assert _job_counts(proc.stdout)["generate_shard"] == 3 * len(base["cohort"]["sets"])


def test_make_compare_trains_controlnet_beside_vcm_with_its_own_steps(tmp_path):
    """The Makefile's ``compare`` override plans one model per method, ControlNet with its own step budget,
    each trained on all the cores in turn (step budgets: no model waits on another's clock)."""
    override = re.search(r"^COMPARE \?= (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1]
    results = tmp_path / "results"
    proc = _dry_run(
        "--printshellcmds",
        "--config",
        f"results={results}",
        f"data={{manifest: {results}/demo/manifest.csv}}",
        override,
        cores=2,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    written = yaml.safe_load((results / ".vcm" / "config.yaml").read_text())["training"]
    assert written["methods"] == ["vcm", "controlnet"]
    assert written["by_method"]["controlnet"]["steps"] < written["steps"]  # VCM keeps the demo's budget
    counts = _job_counts(proc.stdout)
    assert counts["train_vcm"] == counts["evaluate"] == 2 * len(written["sizes"])
    training = re.findall(r"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=(\d+) python -m vcm train-vcm", proc.stdout)
    assert training == ["2"] * counts["train_vcm"]


def test_an_override_that_cannot_work_says_how_to_write_it(tmp_path):
    proc = _dry_run("--config", f"results={tmp_path / 'results'}", "cohort=4")
    assert proc.returncode != 0
    assert (
        "config key 'cohort' is a section, got 4: override its keys, e.g. --config 'cohort={size: 32}'"
        in (proc.stdout + proc.stderr)
    )
