# Config validation, the resolved config every stage reads, the manifest's subjects, and the functions
# that rules use as params (rerun triggers, thread counts, folders derived from input files).
import functools
import hashlib
import inspect
import json
import math
import os
import shlex
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import update_config

from vcm.cohort.plan import shard_range
from vcm.config import ConfigError, coerce_overrides, dump_config, load_schema, validate_config
from vcm.condition_names import condition_names, uses_second_image
from vcm.grid import Grid
from vcm.prep.gates import required_structures
from vcm.prep.manifest import ManifestError, read_manifest

# `--config 'cohort={size: 4}'` arrives with string leaves ({"size": "4"}), already deep-merged over the
# config file: merging the overrides again, typed by the schema, makes them what the config file would hold.
try:
    update_config(config, coerce_overrides(workflow.config_settings.config))
    CFG = validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

RESULTS = CFG["results"].rstrip("/")
# The control methods trained side by side (model paths models/<method>/...), the one a cohort samples from,
# and the method wildcard's constraint: the schema's names only (never a condition set or "qc_segmenter").
METHODS = list(CFG["training"]["methods"])
COHORT_METHOD = CFG["cohort"]["method"] or METHODS[0]
METHOD_PATTERN = "|".join(load_schema()["properties"]["training"]["properties"]["methods"]["items"]["enum"])
LOGS = f"{RESULTS}/logs"
PREP = f"{RESULTS}/prep"
MANIFEST = CFG["data"]["manifest"]
DEMO_MANIFEST = f"{RESULTS}/demo/manifest.csv"

# Stages read the validated, defaulted config from one file; it is rewritten only when it changes,
# so its timestamp does not trigger reruns. Rules list the config sections they depend on as params,
# so that a change to a section reruns exactly the rules that use it.
CONFIG_FILE = f"{RESULTS}/.vcm/config.yaml"
_text = dump_config(CFG)
_cfg_path = Path(CONFIG_FILE)
if not _cfg_path.is_file() or _cfg_path.read_text() != _text:
    _cfg_path.parent.mkdir(parents=True, exist_ok=True)
    _tmp = _cfg_path.with_suffix(".tmp")
    _tmp.write_text(_text)
    _tmp.replace(_cfg_path)


# Memory per job in MB, (grids up to 1 M voxels, larger grids): rules declare what they need, profiles only map
# rules to partitions, GPUs and runtimes, so the same profile fits a laptop-sized node for the demo and a GPU
# node at 1 mm. Demo grid: every rule's measured max RSS is under 2.1 GB (results/benchmarks/), but demo_cohort's
# 2.5 GB (two worker processes). It grows with each retry, so a job killed for memory is resubmitted with more.
MEM_MB = {
    "demo_cohort": (3500, 6000),
    "template": (2000, 4000),
    "register_segment": (2000, 8000),
    "conditions": (1000, 3000),
    "dataset": (2000, 8000),
    "backbone_corpus": (2000, 4000),
    "train_backbone": (4000, 32000),
    "encode_latents": (2000, 16000),
    "train_vcm": (4000, 32000),
    "generate_shard": (4000, 16000),
    "merge_cohort": (2000, 8000),
    "evaluate": (4000, 16000),
    "tstr": (2000, 16000),
    "train_qc_segmenter": (2000, 16000),
}
_LARGE_GRID = math.prod(Grid.from_config(CFG["grid"]).shape) > 1_000_000


def mem_mb(rule):
    """The ``mem_mb`` resource of ``rule`` for this config's grid, times the attempt."""
    small, large = MEM_MB[rule]
    return lambda wildcards, attempt: (large if _LARGE_GRID else small) * attempt


def _get(dotted):
    value = CFG
    for part in dotted.split("."):
        value = value[part]
    return value


def section(*keys):
    """A short digest of config sections (dotted keys allowed), for rule params (rerun triggers)."""
    return hashlib.sha256(json.dumps([_get(k) for k in keys], sort_keys=True).encode()).hexdigest()[:16]


# Without a backbone, `rule all` stops at dataset.h5 (and says so) instead of failing on a missing input.
_bundle = Path(CFG["backbone"]["bundle"])
HAVE_BACKBONE = CFG["backbone"]["retrain"] or (_bundle / "models" / "model.pt").is_file()
if not HAVE_BACKBONE:
    logger.warning(
        f"vcm: backbone.bundle {_bundle} has no models/model.pt, so this run stops at dataset.h5; point "
        "backbone.bundle at a BrainLDM model-zoo folder, or set backbone.retrain: true to train the tiny backbone"
    )

# A user manifest is checked before any job runs: structural problems (missing columns, duplicate ids) stop
# here, and so do row-level ones (age, sex) under data.strict; otherwise check_inputs excludes those subjects.
if MANIFEST != DEMO_MANIFEST and Path(MANIFEST).exists():
    try:
        read_manifest(MANIFEST, strict=CFG["data"]["strict"])
    except ManifestError as err:
        raise WorkflowError(str(err)) from None


@functools.lru_cache(maxsize=4)
def _subjects_table(path, mtime):
    # Plain dicts: input and params functions run once per job, pandas .loc would dominate large DAGs.
    rows = pd.read_csv(path, dtype={"subject": str}).to_dict("records")
    return {row["subject"]: row for row in rows}


@functools.cache
def _checked_subjects():
    # Snakemake's checkpoint lookup expands the rule's outputs on every call (2 per subject); once it succeeds
    # the checkpoint stays complete for the rest of the run, so its path is kept (a lookup that raises is not).
    return checkpoints.check_inputs.get().output.subjects


def subjects_table():
    """Subjects that passed the input checks (available once the check_inputs checkpoint ran)."""
    path = _checked_subjects()
    return _subjects_table(path, Path(path).stat().st_mtime)


def subject_row(wildcards):
    return subjects_table()[wildcards.subject]


def input_subjects():
    """Subjects that passed the input checks: each gets the per-subject jobs."""
    return list(subjects_table())


def dataset_subjects():
    """Subjects that passed every gate (available once the subject_gates checkpoint ran): dataset.h5's."""
    path = checkpoints.subject_gates.get().output.passed
    return list(_subjects_table(path, Path(path).stat().st_mtime))


# --- params functions of the rules (Snakemake's linter keeps functions out of rule files) -----------------


def eval_digest(*parts):
    """Rerun trigger: a short digest of the config values a rule reads."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_settings(wildcards):
    """Rerun trigger: what one model depends on (not the other methods, condition sets or the cohort's size)."""
    other_methods = {"vcm", "controlnet"} - {wildcards.method}  # their training.<method> blocks
    training = CFG["training"]
    parts = [
        wildcards.method,
        {k: v for k, v in training.items() if k not in ("sizes", "methods", "by_method", *other_methods)},
        *([own] if (own := training["by_method"].get(wildcards.method)) else []),  # no change without one
        CFG["backbone"],
        CFG["condition_sets"].get(wildcards.condset),
        CFG["cohort"]["sampler"],  # previews
        CFG["cohort"]["steps"],
        CFG["conditions"]["lv_labels"],  # previews' LV Dice
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def shard_settings(wildcards):
    """Rerun trigger of one shard: what its subjects depend on and which subjects it holds. Subjects depend on
    (seed, index) only, so growing cohort.size reruns no complete shard but the last, partial one."""
    c = CFG["cohort"]
    r = shard_range(int(wildcards.shard), c["size"], c["shard_size"])
    subjects = [r.start, r.stop]
    parts = [
        {key: value for key, value in c.items() if key not in ("sets", "size", "shard_size", "qc_workers")},
        subjects,
        CFG["qc"],
        CFG["segmentation"],
        CFG["conditions"],
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_threads(wildcards):
    """Threads of a training job: 2 on a cluster (no --cores). Locally, models budgeted in steps train one
    after another on all the cores (1.8x the steps of 1 thread on 2 cores); a wall-clock budget
    (training.minutes, or a method's) makes every model train at once, the cores shared between them.
    Over-subscribing a few cores is worse than sharing them (measured: 2 threads ran 4x slower than 1 on 2 busy
    cores)."""
    cores = workflow.global_resources.get("_cores")
    cores = getattr(cores, "value", cores)  # Snakemake 9.27 holds a Resource here, 9.15 an int
    if cores is None or cores >= 1024:
        return 2
    training = CFG["training"]
    clocked = [training["by_method"].get(m, {}).get("minutes", training["minutes"]) for m in METHODS]
    return max(1, cores // max(1, len(MODELS))) if any(clocked) else cores


def shell_option(flag, path):
    """``flag path`` for a shell command, the path quoted; ``""`` without a path (an optional input file)."""
    return f"{flag} {shlex.quote(str(path))}" if path else ""


# Folders that stages take as arguments, derived from the rule's own input files (not hardcoded prefixes, so
# they follow the files wherever Snakemake puts them).
def bundle_dir(wildcards, input):
    """The bundle folder of the rule's ``bundle`` files (the first is ``<bundle>/models/autoencoder.pt``)."""
    return os.path.dirname(os.path.dirname(input.bundle[0]))


def template_dir(wildcards, input):
    """The template folder of the rule's ``template_head`` input (``<template>/t1_head.nii.gz``)."""
    return os.path.dirname(input.template_head)


def remember_signatures(rules):
    """Give Snakemake the parameters of every input, params and resources function of ``rules`` once.

    Snakemake reads a function's signature (``inspect.signature``) each time it calls it, several times a job:
    67 000 reads, a sixth of the DAG's CPU time, for 1 000 subjects and 625 shards (docs/benchmarks.md). A
    signature never changes; ``overwrite_function_params`` is Snakemake's own way to state one (its ``subpath``
    helper uses it), given the parameters mapping that ``inspect`` returns, as Snakemake reads their kinds.
    """
    try:
        from snakemake.common import overwrite_function_params
    except ImportError:  # an older Snakemake: the signatures are read each time, as before
        return
    for each in rules:
        for item in [*each.input, *each.params, *each.resources.values()]:
            func = getattr(item, "callable", item)  # a flagged input function keeps its function there
            if inspect.isfunction(func):
                overwrite_function_params(func, inspect.signature(func).parameters)
