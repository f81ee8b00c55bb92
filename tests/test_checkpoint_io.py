"""Checkpoint files: atomic writes, and a damaged file named with what to do (issue 13, point 6)."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_asyncpipe import AsyncPipeStrategy
from lightning_asyncpipe.checkpoint_io import AtomicCheckpointIO, check_readable
from lightning_asyncpipe.errors import CheckpointError
from tests.helpers.launch import run_script

CHECKPOINT = {"state_dict": {"w": torch.arange(50_000.0)}, "global_step": 3}


def _saved(tmp_path) -> str:
    path = str(tmp_path / "good.ckpt")
    AtomicCheckpointIO().save_checkpoint(CHECKPOINT, path)
    return path


def test_a_saved_checkpoint_loads(tmp_path) -> None:
    loaded = AtomicCheckpointIO().load_checkpoint(_saved(tmp_path))
    assert torch.equal(loaded["state_dict"]["w"], CHECKPOINT["state_dict"]["w"]) and loaded["global_step"] == 3
    assert os.listdir(tmp_path) == ["good.ckpt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, damage: str) -> None:
    good = _saved(tmp_path)
    path = tmp_path / f"{damage}.ckpt"
    data = open(good, "rb").read()
    content = {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100, "empty": b""}
    if damage != "missing":
        path.write_bytes(content[damage])
    with pytest.raises(CheckpointError, match="previous checkpoint") as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(path) in str(err.value)
    if damage != "missing":
        assert f"({path.stat().st_size} bytes)" in str(err.value)


def test_a_crash_mid_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = _saved(tmp_path)
    before = open(path, "rb").read()

    def crash(checkpoint, f) -> None:
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr("lightning_asyncpipe.checkpoint_io._save", crash)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"other": 1}, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["good.ckpt"]
    check_readable(path)


def test_the_strategy_writes_atomically_by_default_and_keeps_a_given_io() -> None:
    assert isinstance(AsyncPipeStrategy().checkpoint_io, AtomicCheckpointIO)
    mine = AtomicCheckpointIO()
    assert AsyncPipeStrategy(checkpoint_io=mine).checkpoint_io is mine


@pytest.mark.multiprocess
def test_fit_from_a_truncated_checkpoint_fails_before_launch(tmp_path) -> None:
    good = _saved(tmp_path)
    data = open(good, "rb").read()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    result = run_script("fit_faulty.py", "ckpt", str(tmp_path / "cut.ckpt"), timeout=120)
    assert result.returncode != 0
    assert f"CheckpointError: The checkpoint {tmp_path / 'cut.ckpt'}" in result.output, result.output[-3000:]
    assert "truncated" in result.output and "Initializing distributed" not in result.output  # no process started
    assert result.elapsed < 60
