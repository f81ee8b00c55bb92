"""SIGTERM (a scheduler's preemption) or SIGINT (Ctrl+C, kill -INT) sent to any one process of a
2-stage run stops every stage within 60 s, with status 128 + signum and a message naming the
signal and the stage, after writing a resumable checkpoint; the resume is exact; no process is
left behind (issue 13, point 5)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import leftover_processes, run_script, signal_rank, start_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

# case -> (signal, global rank of the target: 0 is the main process, holding stage 1,
# accumulate_grad_batches). Each signal and each kind of target once (the handler does not depend
# on the pair; the full 2 x 2 passed and was cut to keep the suite short). The second case trains
# asynchronous windows of 2 batches: a signal that lands inside one stops at the window's end (its
# first batch has not run yet), so that the checkpoint resumes exactly.
CASES = {
    "SIGTERM-stage0-child": (signal.SIGTERM, 1, 1),
    "SIGINT-stage1-main-window2": (signal.SIGINT, 0, 2),
}


def _signalled_run(out: Path, signum: int, target: int, accumulate: int) -> tuple[int, str, float, dict]:
    token = uuid.uuid4().hex
    proc = start_script("fit_signal.py", "train", out, token, accumulate)
    output, elapsed, victim = signal_rank(proc, out, 2, target, signum)
    assert not leftover_processes(token)
    return proc.returncode, output, elapsed, victim


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str, float, dict]]:
    root = tmp_path_factory.mktemp("signals")
    results = {}
    for case, (signum, target, accumulate) in CASES.items():
        (root / case).mkdir()
        results[case] = (root / case, *_signalled_run(root / case, signum, target, accumulate))
    resumable = [case for case in CASES if (root / case / "ckpt" / "interrupted.ckpt").exists()]
    resumed = run_script("fit_signal.py", "resume", root, *resumable, timeout=240)
    assert resumed.returncode == 0, resumed.output[-5000:]
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_signal_stops_every_stage_named_and_non_zero(runs, case: str) -> None:
    signum, target, _ = CASES[case]
    folder, code, output, elapsed, victim = runs[case]
    print(f"{case}: every process ended {elapsed:.1f} s after the signal, status {code}")
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert code == 128 + signum, output[-5000:]
    name = signal.Signals(signum).name
    assert f"stage {victim['stage']} (rank {target}) received {name}" in output, output[-5000:]
    assert "stopped every stage after step" in output and f"{name} to stage {victim['stage']} (rank {target})" in output
    assert "ended unexpectedly" not in output, output[-5000:]  # a stop, not a lost stage


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_written_on_the_signal_resumes_exactly(runs, case: str) -> None:
    folder = runs[case][0]
    ckpt = torch.load(folder / "ckpt" / "interrupted.ckpt", weights_only=False)
    assert ckpt["global_step"] >= 5 and ckpt["asyncpipe"]["step"] == ckpt["global_step"]
    assert f"resumable checkpoint: {folder / 'ckpt' / 'interrupted.ckpt'}" in runs[case][2]
    straight, resumed = torch.load(folder / "straight.pt"), torch.load(folder / "resumed.pt")
    for key in straight:  # the same arithmetic in the same order on both sides: bitwise
        assert torch.equal(resumed[key], straight[key]), key
    assert any(not torch.equal(straight[k], ckpt["state_dict"][k]) for k in straight)  # the resumed steps trained
