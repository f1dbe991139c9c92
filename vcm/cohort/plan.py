"""The cohort's plan: its settings, which subjects each shard holds, and every seed a subject is made from.

Everything here is a pure function of the validated config and a subject's global index, so that a subject
is the same whatever the shard size, the shard it falls in or the run that makes it. The module imports no
more than NumPy: the Snakefile asks it for the shard ids (:func:`shard_ids`) instead of deriving them again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from vcm.errors import StageError

__all__ = [
    "CohortSettings",
    "anatomy_rng",
    "design_rng",
    "match_rng",
    "n_shards",
    "noise_seed",
    "shard_ids",
    "shard_range",
    "source_order",
    "subject_id",
]

# independent random streams of SeedSequence([seed, stream, ...])
STREAM_NOISE, STREAM_ANATOMY, STREAM_SOURCES, STREAM_DESIGN, STREAM_MATCH = 0, 1, 2, 3, 4


@dataclass
class CohortSettings:
    """The config's ``cohort`` section, read from the validated config (the schema owns the defaults).

    Args:
        size: synthetic subjects in the cohort.
        shard_size: subjects per shard (one job each).
        sampler: ``ddim`` or ``dpmpp_2m`` (:data:`vcm.diffusion.SAMPLERS`; the schema checks the name).
        steps: sampling steps (network evaluations per sample).
        control_scale: multiplies the control module's correction at every step (1: as trained;
            :func:`vcm.models.vcm.modulate`).
        new_anatomy_fraction: probability that a subject gets a deformed (new) anatomy.
        seed: base seed; every subject's randomness derives from ``(seed, index[, attempt])``.
        batch_size: samples per sampling batch (partial batches are padded to this size).
        decode_chunk: samples per full-resolution pass (condition encoder, autoencoder decoder).
        sources: real subjects that lend their conditions: ``train`` (the model's training split), ``val``,
            ``all``. Conditions of validation subjects would leak into a train-on-synthetic evaluation on
            them, hence the default.
        deform_max_mm: largest displacement of a new anatomy's deformation.
        deform_smoothness_mm: spacing of the deformation's random control points (its correlation length).
        qc_workers: threads that QC and write the subjects of a batch while the next batch samples (one
            subject each; 0: QC inline, after each batch). A sample depends only on its own seed, so the cohort
            is identical whatever the number (tested). A GPU node's spare cores hide the CPU-bound QC.
        design: ``cohort.design``, the covariates the cohort should have (:class:`vcm.cohort.design.Design`
            resolves it).
        match_lv_ratio: with an LV-volume target in ``design``, a subject's source is drawn among the sources
            whose LV volume is within this factor of the target (the nearest source when none is), so that
            steering pushes its ventricles little; ``None``: every source once per round, whatever the target.
        retry_new_anatomy: a retry after a failed QC attempt redraws the subject's plan — its source and new
            anatomy, not its design targets — instead of sampling the same label map with new noise: a failing
            subject's attempts on one label map miss by the same amount (demo, session 30), so new noise
            rarely rescues it.
    """

    size: int
    shard_size: int
    sampler: str
    steps: int
    control_scale: float
    new_anatomy_fraction: float
    seed: int
    batch_size: int
    decode_chunk: int
    sources: tuple[str, ...]
    deform_max_mm: float
    deform_smoothness_mm: float
    qc_workers: int
    design: dict[str, Any]
    match_lv_ratio: float | None
    retry_new_anatomy: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> CohortSettings:
        """The settings of a config validated by :func:`vcm.config.validate_config` (defaults filled in).

        Raises:
            StageError: a key is missing (the config was not validated) or a value is out of range (the
                config was changed after validation).
        """
        section = dict(cfg.get("cohort") or {})
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in section]
        if missing:
            raise StageError(
                f"config key 'cohort.{missing[0]}' is missing: read the config with vcm.config.load_config, "
                "which fills in the schema's defaults"
            )
        out = cls(**{k: section[k] for k in names})
        out.sources = tuple([out.sources] if isinstance(out.sources, str) else out.sources)
        bad = [s for s in out.sources if s not in ("train", "val", "all")]
        if bad or not out.sources:
            raise StageError(
                f"config key 'cohort.sources': expected a list of train, val, all; got {out.sources!r}"
            )
        for key in ("size", "shard_size", "steps", "batch_size", "decode_chunk"):
            if int(getattr(out, key)) < 1:
                raise StageError(f"config key 'cohort.{key}': expected >= 1, got {getattr(out, key)}")
        if int(out.qc_workers) < 0:
            raise StageError(f"config key 'cohort.qc_workers': expected >= 0, got {out.qc_workers}")
        if out.match_lv_ratio is not None and not float(out.match_lv_ratio) >= 1:
            raise StageError(
                f"config key 'cohort.match_lv_ratio': expected null or >= 1, got {out.match_lv_ratio}"
            )
        return out

    def signature_parts(self) -> dict[str, Any]:
        """What a subject's data depends on (not the cohort or shard size, which only say which subjects)."""
        return {k: v for k, v in asdict(self).items() if k not in ("size", "shard_size", "qc_workers")}


# --- shards and subjects -----------------------------------------------------------------------------------


def n_shards(size: int, shard_size: int) -> int:
    """Shards of ``shard_size`` subjects that hold a cohort of ``size`` (the last one may be partial)."""
    return math.ceil(size / shard_size)


def shard_ids(cfg: Mapping[str, Any]) -> list[str]:
    """The stable shard ids ``00000``, ``00001``, … of the validated config's cohort.

    The one derivation of the shards: ``generate-shard`` jobs, ``merge-cohort`` and the Snakefile use it.
    """
    cohort = cfg["cohort"]
    return [f"{k:05d}" for k in range(n_shards(int(cohort["size"]), int(cohort["shard_size"])))]


def shard_range(shard: int, size: int, shard_size: int) -> range:
    """Global subject indices of shard ``shard``."""
    if not 0 <= shard < n_shards(size, shard_size):
        raise StageError(
            f"shard {shard} does not exist: cohort.size {size} / shard_size {shard_size} makes {n_shards(size, shard_size)} shards"
        )
    return range(shard * shard_size, min((shard + 1) * shard_size, size))


def subject_id(index: int) -> str:
    """The synthetic subject's id, also its folder's name: ``syn-00012``."""
    return f"syn-{index:05d}"


# --- seeds -------------------------------------------------------------------------------------------------


def _seed_from(*entropy: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence hashing: nearby inputs give unrelated seeds)."""
    a, b = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return int((int(a) << 32 | int(b)) & 0x7FFF_FFFF_FFFF_FFFF)


def noise_seed(base: int, index: int, attempt: int = 0) -> int:
    """The initial-noise seed of subject ``index``'s attempt ``attempt`` (0 = first try)."""
    return _seed_from(base, STREAM_NOISE, index, attempt)


def _draw_entropy(base: int, stream: int, index: int, draw: int) -> list[int]:
    # draw 0 keeps the entropy it had before retries could redraw an anatomy: first attempts are unchanged
    return [base, stream, index] + ([draw] if draw else [])


def anatomy_rng(base: int, index: int, draw: int = 0) -> np.random.Generator:
    """Subject ``index``'s generator of its new-anatomy draw and deformation (``draw``: the redraw after
    ``draw`` failed QC attempts, :attr:`CohortSettings.retry_new_anatomy`)."""
    return np.random.default_rng(np.random.SeedSequence(_draw_entropy(base, STREAM_ANATOMY, index, draw)))


def design_rng(base: int, index: int, covariate: int) -> np.random.Generator:
    """Subject ``index``'s generator of its design target for covariate number ``covariate`` (one stream each)."""
    return np.random.default_rng(np.random.SeedSequence([base, STREAM_DESIGN, index, covariate]))


def match_rng(base: int, index: int, draw: int = 0) -> np.random.Generator:
    """Subject ``index``'s generator of its draw among the sources that match its LV target (``draw``: as
    :func:`anatomy_rng`'s; a redraw without matching draws its source from this stream too)."""
    return np.random.default_rng(np.random.SeedSequence(_draw_entropy(base, STREAM_MATCH, index, draw)))


def source_order(base: int, round_: int, n: int) -> np.ndarray:
    """The order in which round ``round_`` visits the ``n`` condition sources (a seeded permutation)."""
    return np.random.default_rng(np.random.SeedSequence([base, STREAM_SOURCES, round_])).permutation(n)
