"""LightningCLI picks the strategy from the command line (issue 15, point 10): by its registered
name (``--trainer.strategy pipemare``) and in the class-path form with its arguments."""

from __future__ import annotations

import pytest

from tests.helpers.launch import run_script

pytestmark = pytest.mark.multiprocess

COMMON = ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "1",
          "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trainer.strategy", "pipemare"], "policy=pipemare microbatches=4"),
        (["--trainer.strategy", "lightning_asyncpipe.AsyncPipeStrategy", "--trainer.strategy.policy", "pipedream_2bw",
          "--trainer.strategy.microbatches", "2"], "policy=pipedream_2bw microbatches=2"),
    ],
    ids=["registered-name", "class-path"],
)
def test_lightning_cli_trains_with_the_strategy_from_the_command_line(tmp_path, args: list[str], expected: str) -> None:
    result = run_script("cli_fit.py", *COMMON, "--trainer.default_root_dir", tmp_path, *args, timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    for rank in (0, 1):
        assert f"rank {rank}: AsyncPipeStrategy {expected} steps=6" in result.output
