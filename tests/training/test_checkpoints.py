"""The checkpoint store (vcm.training.checkpoints): the stale policy, atomic writes, random state, signals."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from vcm.training.checkpoints import (
    FINAL,
    LATEST,
    STALE_SUFFIX,
    CheckpointStore,
    Interrupt,
    restore_rng_state,
    rng_state,
    signature,
)


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_a_checkpoint_round_trips_with_its_signature_and_weights_only(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", signature({"lr": 1e-3}))
    path = store.save(state(2))
    assert path == tmp_path / "ckpt" / LATEST
    raw = torch.load(path, weights_only=True)
    assert raw["signature"] == store.signature and raw["step"] == 2
    assert store.latest()["step"] == 2 and store.final() is None
    assert store.save(state(5), final=True) == tmp_path / "ckpt" / FINAL
    assert store.resume()["step"] == 5  # a completed run is not retrained


def test_a_checkpoint_of_other_settings_is_set_aside_with_a_warning(tmp_path, caplog):
    old = CheckpointStore(tmp_path, signature({"lr": 1e-3}))
    old.save(state(4))
    new = CheckpointStore(tmp_path, signature({"lr": 2e-3}))
    with caplog.at_level(logging.WARNING, logger="vcm.training.checkpoints"):
        assert new.latest() is None
    stale = tmp_path / (LATEST + STALE_SUFFIX)
    assert not (tmp_path / LATEST).exists() and stale.is_file()
    message = caplog.text
    assert str(tmp_path / LATEST) in message
    assert old.signature[:12] in message and new.signature[:12] in message
    # nothing lost: the stale file is the old checkpoint, loadable as it was
    assert torch.load(stale, weights_only=True)["step"] == 4
    # the new run starts over and writes its own latest checkpoint beside it
    new.save(state(1))
    assert new.latest()["step"] == 1 and stale.is_file()


def test_resume_skips_a_stale_final_for_a_matching_latest(tmp_path):
    sig = signature({"a": 1})
    CheckpointStore(tmp_path, signature({"a": 0})).save(state(9), final=True)
    CheckpointStore(tmp_path, sig).save(state(3))
    assert CheckpointStore(tmp_path, sig).resume()["step"] == 3
    assert (tmp_path / (FINAL + STALE_SUFFIX)).is_file() and not (tmp_path / FINAL).exists()


def test_a_reader_that_does_not_own_the_folder_neither_renames_nor_warns(tmp_path, caplog):
    CheckpointStore(tmp_path, signature({"a": 0})).save(state(1))
    with caplog.at_level(logging.WARNING, logger="vcm.training.checkpoints"):
        assert CheckpointStore(tmp_path, signature({"a": 1}), owner=False).latest() is None
    assert (tmp_path / LATEST).is_file() and not caplog.records


def test_an_unreadable_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / LATEST).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="vcm.training.checkpoints"):
        assert CheckpointStore(tmp_path, "sig").latest() is None
    assert "unreadable" in caplog.text
    assert (
        CheckpointStore(tmp_path, "sig").save(state(1)) == tmp_path / LATEST
    )  # overwritten by the next save


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, "sig")
    store.save(state(1))
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkp")  # vcm.io.save_torch hands torch an open file
        raise KeyboardInterrupt  # the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        store.save(state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert store.latest()["step"] == 1
    assert sorted(os.listdir(tmp_path)) == [LATEST]  # no temporary file left behind


def test_signature_depends_on_values_not_on_key_order():
    assert signature({"a": 1, "b": [1, 2]}) == signature({"b": [1, 2], "a": 1})
    assert signature({"a": 1}) != signature({"a": 2})
    assert signature({"path": Path("a/b")}) == signature({"path": "a/b"})  # other values by str()


def test_rng_state_restores_torch_and_the_generator():
    g = torch.Generator().manual_seed(3)
    saved = rng_state(g)
    first = (torch.rand(4), torch.rand(4, generator=g))
    restore_rng_state(saved, g)
    again = (torch.rand(4), torch.rand(4, generator=g))
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_interrupt_turns_a_signal_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with Interrupt() as interrupt:
        assert not interrupt.flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert interrupt.flag
    assert signal.getsignal(signal.SIGUSR1) == before
