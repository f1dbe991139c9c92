"""Registration, then segmentation, of one subject in one process: the workflow's ``register_segment`` job.

The two stages stay what they are (``python -m vcm register`` and ``python -m vcm segment``, each with its
own gates and status file, ``status/register.json`` and ``status/segment.json``); this command runs them in
turn, so a subject costs the DAG one job and its node one Python start instead of two: for a 1 000-subject
manifest the dry run plans 1 000 fewer jobs and a cluster queues 1 000 fewer (docs/benchmarks.md, *DAG
build*). A subject excluded at registration passes through segmentation as an exclusion, as before.
"""

from __future__ import annotations

from vcm.prep import registration, segmentation
from vcm.stage import stage_parser


def cli(argv: list[str]) -> int:
    parser = stage_parser("register-segment", __doc__)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--t1", required=True, help="native T1")
    parser.add_argument("--t2", default=None, help="second modality of the same session (t2 condition)")
    parser.add_argument("--meta", required=True, help="the subject's check-inputs JSON (gives the seg path)")
    parser.add_argument("--template-dir", required=True)
    parser.add_argument("--out-dir", required=True, help="the subject's prep folder (both write there)")
    parser.add_argument("--register-status", required=True, help="the register stage's status")
    parser.add_argument("--segment-status", required=True, help="the segment stage's status")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    common = ["--config", args.config, "--subject", args.subject, "--t1", args.t1]
    common += ["--template-dir", args.template_dir, "--out-dir", args.out_dir]
    registration.cli(
        [*common, "--status", args.register_status, "--threads", str(args.threads)]
        + (["--t2", args.t2] if args.t2 else [])
    )
    segmentation.cli(
        [*common, "--meta", args.meta, "--reg-dir", args.out_dir, "--status", args.segment_status]
        + ["--previous-status", args.register_status]
    )
    return 0
