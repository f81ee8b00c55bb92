"""A stage process killed with SIGKILL mid-training ends the whole job within 60 s, non-zero, with
a message naming the lost stage and rank, and leaves no process behind (issue 6, point 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers.launch import ROOT, SCRIPTS, leftover_processes


def _start(out, token: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK",
                                                             "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")}  # fmt: skip
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPTS / "fit_killed.py"), str(out), token], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", [1, 0], ids=["child-rank-1", "main-process-rank-0"])
def test_killed_stage_ends_the_job_and_is_named(tmp_path, victim: int) -> None:
    token = uuid.uuid4().hex
    proc = _start(tmp_path, token)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.pid").exists() for r in range(3)):
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "the run did not reach step 5"
            time.sleep(0.2)
        time.sleep(0.5)  # the files are complete
        ranks = {r: json.loads((tmp_path / f"rank{r}.pid").read_text()) for r in range(3)}
        os.kill(ranks[victim]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=90)  # returns when every process holding the output has ended
        elapsed = time.monotonic() - killed
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lost = f"stage {ranks[victim]['stage']} (rank {victim}"
    print(f"victim rank {victim}: every process ended {elapsed:.1f} s after the kill")
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert proc.returncode != 0
    assert lost in out and "ended unexpectedly" in out, out[-5000:]
    assert not leftover_processes(token)
