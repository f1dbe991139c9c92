import argparse

import pytest
import torch

from vcm.stage import configure_runtime, resolve_device, stage_parser


def test_stage_parser_prologue():
    parser = stage_parser("tstr", "Train-on-synthetic, test-on-real.\n\nmore text", threads=True, device=True)
    assert parser.prog == "python -m vcm tstr"
    assert parser.description == "Train-on-synthetic, test-on-real."
    args = parser.parse_args(["--config", "c.yaml", "--threads", "1", "--device", "cpu"])
    assert (args.config, args.threads, args.device) == ("c.yaml", 1, "cpu")


def test_stage_parser_requires_config_unless_told():
    with pytest.raises(SystemExit):
        stage_parser("x", None).parse_args([])
    args = stage_parser("x", None, config=False).parse_args([])
    assert not hasattr(args, "config") and not hasattr(args, "threads")


@pytest.mark.parametrize(("name", "expected"), [("cpu", "cpu"), (None, "cpu"), ("auto", "cpu")])
def test_resolve_device_on_a_cpu_machine(name, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(name) == torch.device(expected)


def test_configure_runtime_sets_threads_and_device():
    before = torch.get_num_threads()
    try:
        device = configure_runtime(argparse.Namespace(threads=1, device="cpu"))
        assert device == torch.device("cpu") and torch.get_num_threads() == 1
        assert configure_runtime(argparse.Namespace(threads=None)) is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("stage", ["evaluate", "eval-tables", "tstr", "mask-edit", "train-segmenter"])
def test_stage_command_lines_share_the_prologue(stage, capsys):
    from vcm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m vcm {stage} ")
    assert ("--config CONFIG" in text) == (stage != "eval-tables")
    assert ("--threads THREADS" in text and "--device DEVICE" in text) == (stage != "eval-tables")


def _environment_stage(argv: list[str]) -> int:
    """A stage for the test below: prints what NumPy's BLAS would read."""
    import os

    from vcm.cli import BLAS_THREAD_VARIABLES

    print(" ".join(os.environ.get(name, "-") for name in BLAS_THREAD_VARIABLES))
    return 0


@pytest.mark.parametrize(
    ("argv", "expected"), [(["--threads", "3"], "3 3 3"), (["--threads=1"], "1 1 1"), ([], "- - -")]
)
def test_a_stage_gives_its_threads_to_numpys_blas_before_loading_it(argv, expected, monkeypatch, capsys):
    from vcm.cli import BLAS_THREAD_VARIABLES, STAGES, main

    for name in BLAS_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # main sets them in this process: restored after the test
    monkeypatch.setitem(STAGES, "environment", "tests.test_stage:_environment_stage")
    assert main(["environment", *argv]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_the_command_line_loads_no_numpy_before_the_stage():
    import subprocess
    import sys

    code = "import sys, vcm.cli; print('numpy' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )
