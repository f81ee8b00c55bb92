"""A stage process killed with SIGKILL mid-training ends the whole job within 60 s, non-zero, with
a message naming the lost stage and rank, and leaves no process behind (issue 6, point 3)."""

from __future__ import annotations

import signal
import uuid

import pytest

from tests.helpers.launch import leftover_processes, signal_rank, start_script


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0], ids=["child-rank-1", "main-process-rank-0"])
def test_killed_stage_ends_the_job_and_is_named(tmp_path, victim: int) -> None:
    token = uuid.uuid4().hex
    proc = start_script("fit_killed.py", tmp_path, token)
    out, elapsed, killed = signal_rank(proc, tmp_path, 3, victim, signal.SIGKILL)
    lost = f"stage {killed['stage']} (rank {victim}"
    print(f"victim rank {victim}: every process ended {elapsed:.1f} s after the kill")
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert proc.returncode != 0
    assert lost in out and "ended unexpectedly" in out, out[-5000:]
    assert not leftover_processes(token)
