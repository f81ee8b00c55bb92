"""The main job (examples/train.py) at reduced size: the README's override and multirun commands."""

from __future__ import annotations

import re

import pytest

from tests.helpers.launch import ROOT, run_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

TRAIN = ROOT / "examples" / "train.py"


@pytest.mark.multiprocess
def test_override_command(tmp_path) -> None:
    result = run_script(
        TRAIN, "experiment=quick", "strategy=pipemare", "trainer.devices=4", "strategy.microbatches=8",
        "trainer.max_steps=8", "trainer.val_check_interval=4", "timeline.first_step=3", "timeline.steps=2",
        f"hydra.run.dir={tmp_path}", timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.output[-5000:]
    out = result.output
    assert "final train_loss" in out and "samples/s" in out
    # the summary's throughput is the whole run's: every trained sample over the training time
    run = re.search(r"([\d.]+) samples/s, \d+ tokens/s over the run \((\d+) samples in ([\d.]+) s", out)
    assert run is not None, out[-3000:]
    assert int(run[2]) == 8 * 16  # max_steps x the quick experiment's batch size
    assert float(run[1]) == pytest.approx(int(run[2]) / float(run[3]), rel=0.05)
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "MiB" in line]
    assert len(rows) == 4  # one summary row per stage
    assert (tmp_path / "timeline" / "timeline.png").exists() and (tmp_path / "timeline" / "timeline.json").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().count("pipeline/stage3/bubble") == 1


@pytest.mark.multiprocess
def test_multirun_runs_each_job(tmp_path) -> None:
    result = run_script(
        TRAIN, "-m", "experiment=quick", "strategy=gpipe,pipedream_2bw", "trainer.max_steps=6",
        "timeline.first_step=2", "timeline.steps=2", f"hydra.sweep.dir={tmp_path}", timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.output[-5000:]
    assert result.output.count("final train_loss") == 2
    for job in ("0", "1"):
        assert (tmp_path / job / "csv" / "version_0" / "metrics.csv").exists()
        assert (tmp_path / job / "timeline" / "timeline.png").exists()
    assert "strategy=gpipe" in (tmp_path / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "strategy=pipedream_2bw" in (tmp_path / "1" / ".hydra" / "overrides.yaml").read_text()
