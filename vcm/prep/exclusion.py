"""Exclusions: how a subject leaves preparation, with its stage and reason, without stopping the run.

Snakemake has no optional outputs, so an excluded subject's jobs still complete, explicitly:

* every per-subject stage (``register``, ``segment``, ``conditions``; the workflow runs the first two in one
  job, ``register-segment``) runs inside :func:`run_subject_stage`,
  which writes the stage's **status** (``prep/<subject>/status/<stage>.json``: ``passed``, or ``excluded``
  with the stage that excluded the subject, the failed gates and the reason). A failed gate
  (:mod:`vcm.prep.gates`) or any exception in the stage's work excludes the subject; an exception that is
  not a :class:`~vcm.errors.StageError` (a bug) prints its traceback to the job's log first. Memory and
  disk-full errors are the machine's, not the subject's: they still fail the job, so that it is retried;
* a stage whose previous stage's status says ``excluded`` does no work and carries that exclusion on;
* an excluded subject's declared outputs that its stage did not write are **placeholders**: empty files (no
  reader takes them for a volume or a table), and a picture that says why for a ``.png``. Files the stage
  did write (the registered T1 of a registration that failed its gate, its overlay) stay for inspection;
* the ``subject_gates`` checkpoint (``python -m vcm subject-gates``) reads every subject's last status and
  writes ``excluded.csv`` (the input checks' exclusions, then these: ``subject, stage, gate, reason, t1``)
  and ``passed.csv``, the only subjects ``dataset.h5`` is built from.

Every exclusion is logged as one line, ``subject <id>: excluded at <stage>: <reason>``.
"""

from __future__ import annotations

import errno
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vcm.errors import StageError
from vcm.io import atomic_path, read_json, write_json, write_text
from vcm.prep.gates import Failure
from vcm.stage import stage_parser

__all__ = [
    "EXCLUDED_COLUMNS",
    "STAGES",
    "Exclusion",
    "gather_exclusions",
    "read_status",
    "require_passed",
    "run_subject_stage",
    "status_path",
    "write_status",
]

STAGES = ("check_inputs", "register", "segment", "conditions")
EXCLUDED_COLUMNS = ("subject", "stage", "gate", "reason", "t1")
# Errors of the machine, not of the subject: the job fails (and is retried with more memory), no exclusion.
_MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Exclusion:
    """A subject excluded at ``stage`` by the ``gates`` (``error`` for an exception), for ``reason``."""

    subject: str
    stage: str
    gates: tuple[str, ...]
    reason: str

    @property
    def line(self) -> str:
        """The log line: ``subject <id>: excluded at <stage>: <reason>``."""
        return f"subject {self.subject}: excluded at {self.stage}: {self.reason}"

    @classmethod
    def of(cls, subject: str, stage: str, failures: Sequence[Failure]) -> Exclusion:
        return cls(subject, stage, tuple(f.gate for f in failures), "; ".join(f.reason for f in failures))


def status_path(prep_dir: str | Path, subject: str, stage: str) -> Path:
    """``<prep_dir>/<subject>/status/<stage>.json``: where a per-subject stage records its outcome."""
    return Path(prep_dir) / subject / "status" / f"{stage}.json"


def write_status(path: str | Path, subject: str, stage: str, exclusion: Exclusion | None) -> None:
    """Record a stage's outcome for one subject (atomically): passed, or the exclusion it carries."""
    record: dict = {
        "subject": subject,
        "stage": stage,
        "status": "passed" if exclusion is None else "excluded",
    }
    if exclusion is not None:
        record.update(excluded_at=exclusion.stage, gates=list(exclusion.gates), reason=exclusion.reason)
    write_json(path, record)


def read_status(path: str | Path) -> Exclusion | None:
    """The exclusion a status file records, or ``None`` when the subject passed.

    Raises:
        StageError: the file is missing or is not a status record.
    """
    try:
        record = read_json(path)
        if record["status"] == "passed":
            return None
        return Exclusion(record["subject"], record["excluded_at"], tuple(record["gates"]), record["reason"])
    except FileNotFoundError:
        raise StageError(f"status file {path} not found") from None
    except (ValueError, KeyError, TypeError) as err:
        raise StageError(f"status file {path} is not a stage status ({type(err).__name__}: {err})") from None


def _error_failure(err: Exception) -> Failure:
    """An exception as a failed gate ``error``: a StageError's own line, else the type and first line."""
    if isinstance(err, StageError):
        return Failure("error", str(err))
    first = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
    return Failure("error", f"{type(err).__name__}: {first}")


def _placeholder(path: Path, exclusion: Exclusion) -> None:
    """An output of an excluded subject that its stage did not write: a picture saying why for ``.png``,
    else an empty file (which no NIfTI or JSON reader takes for data)."""
    if path.suffix != ".png":
        write_text(path, "")
        return
    from matplotlib.figure import Figure

    from vcm.plots import save_figure

    fig = Figure(figsize=(6.0, 1.2))
    fig.text(0.02, 0.5, textwrap.fill(exclusion.line, 80), va="center", fontsize=8)
    save_figure(fig, path, dpi=80)


def run_subject_stage(
    subject: str,
    stage: str,
    work: Callable[[], Sequence[Failure]],
    *,
    status: str | Path,
    outputs: Sequence[str | Path],
    previous: str | Path | None = None,
) -> Exclusion | None:
    """Run one subject's stage so that a bad subject becomes an exclusion, never a stopped run.

    The stage's ``outputs`` and ``status`` are removed first (what a previous run left must not pass for
    this run's). Then ``work`` runs unless ``previous`` (the status of the stage before) excludes the
    subject; its failed gates, or any exception it raises, exclude the subject here. The status is written
    last, after the placeholders of the outputs ``work`` did not write.

    Args:
        subject: the subject id.
        stage: the stage's name (``register``, ``segment``, ``conditions``).
        work: does the stage's work and returns its failed gates (empty: passed).
        status: this stage's status file.
        outputs: every file the workflow declares for this stage.
        previous: the previous stage's status file (``None``: the first stage).

    Returns:
        the subject's exclusion (this stage's or an earlier one), or ``None`` when it passed.
    """
    for path in (status, *outputs):
        Path(path).unlink(missing_ok=True)
    exclusion = read_status(previous) if previous is not None else None
    if exclusion is not None:
        print(f"subject {subject}: excluded at {exclusion.stage}; nothing to do at {stage}")
    else:
        try:
            failures = list(work())
        except MemoryError:
            raise
        except OSError as err:
            if err.errno in _MACHINE_ERRNOS:
                raise
            traceback.print_exc()
            failures = [_error_failure(err)]
        except StageError as err:  # an expected failure: its one line is the whole story
            failures = [_error_failure(err)]
        except Exception as err:  # a bug or an unforeseen input: the traceback goes to the job's log
            traceback.print_exc()
            failures = [_error_failure(err)]
        if failures:
            exclusion = Exclusion.of(subject, stage, failures)
            print(exclusion.line, file=sys.stderr)
    if exclusion is not None:
        for path in map(Path, outputs):
            if not path.exists():
                _placeholder(path, exclusion)
    write_status(status, subject, stage, exclusion)
    return exclusion


def require_passed(prep_dir: str | Path, subject: str) -> None:
    """Refuse a subject whose last recorded status is an exclusion (a prepared folder without statuses,
    made by hand, is taken as it is).

    Raises:
        StageError: the subject was excluded.
    """
    path = status_path(prep_dir, subject, STAGES[-1])
    if path.is_file() and (exclusion := read_status(path)) is not None:
        raise StageError(f"{exclusion.line}; it cannot go into the dataset (see excluded.csv)")


def gather_exclusions(
    subjects_csv: str | Path, inputs_excluded_csv: str | Path, prep_dir: str | Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The subjects that passed every gate and the table of every exclusion.

    Args:
        subjects_csv: the subjects that passed the input checks (``check_inputs``'s table).
        inputs_excluded_csv: the input checks' exclusions (:data:`EXCLUDED_COLUMNS`).
        prep_dir: the per-subject folders, whose last status (``status/conditions.json``) is read.

    Returns:
        (the rows of ``subjects_csv`` that passed, the exclusions: the input checks' first, then the
        per-subject stages', each in manifest order).
    """
    subjects = pd.read_csv(subjects_csv, dtype={"subject": str})
    inputs = pd.read_csv(inputs_excluded_csv, dtype={"subject": str})
    rows, keep = [], []
    for row in subjects.to_dict("records"):
        exclusion = read_status(status_path(prep_dir, row["subject"], STAGES[-1]))
        keep.append(exclusion is None)
        if exclusion is not None:
            rows.append(
                {
                    "subject": exclusion.subject,
                    "stage": exclusion.stage,
                    "gate": ", ".join(exclusion.gates),
                    "reason": exclusion.reason,
                    "t1": row["t1"],
                }
            )
    excluded = pd.concat(
        [inputs.reindex(columns=list(EXCLUDED_COLUMNS)), pd.DataFrame(rows, columns=list(EXCLUDED_COLUMNS))],
        ignore_index=True,
    )
    return subjects[keep], excluded


def cli(argv: list[str]) -> int:
    """``python -m vcm subject-gates``: every subject's outcome -> ``excluded.csv`` and ``passed.csv``."""
    parser = stage_parser("subject-gates", __doc__, config=False)
    parser.add_argument("--config", default=None, help="(accepted for symmetry with the other stages)")
    parser.add_argument("--subjects", required=True, help="subjects that passed the input checks (CSV)")
    parser.add_argument("--inputs-excluded", required=True, help="the input checks' exclusions (CSV)")
    parser.add_argument("--prep-dir", required=True, help="folder of <subject>/status/*.json")
    parser.add_argument("--excluded", required=True, help="every exclusion with its stage and reason (CSV)")
    parser.add_argument("--passed", required=True, help="the subjects dataset.h5 is built from (CSV)")
    args = parser.parse_args(argv)
    passed, excluded = gather_exclusions(args.subjects, args.inputs_excluded, args.prep_dir)
    for row in excluded.to_dict("records"):
        if row["stage"] != STAGES[0]:  # check_inputs logged its own
            print(f"subject {row['subject']}: excluded at {row['stage']}: {row['reason']}", file=sys.stderr)
    with atomic_path(args.excluded) as tmp:
        excluded.to_csv(tmp, index=False)
    with atomic_path(args.passed) as tmp:
        passed.to_csv(tmp, index=False)
    per_stage = excluded["stage"].value_counts()
    counts = ", ".join(f"{per_stage[s]} at {s}" for s in STAGES if s in per_stage)
    print(
        f"{len(passed)} subject(s) passed every gate, {len(excluded)} excluded"
        + (f" ({counts})" if counts else "")
    )
    return 0
