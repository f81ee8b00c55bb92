"""Lightning's contract under the strategy (issue 15): ``devices=1`` and several optimizers.

- ``devices=1`` is one stage: the same code path, and (with one micro-batch) bitwise the plain
  one-device Trainer for every policy without a delay on one stage; PipeDream-2BW keeps its
  one-update delay by definition. Before issue 15 it crashed with "IndexError: invalid index of a
  0-dim tensor" (the pipeline metrics of a single stage).
- Two optimizers over layers of different stages fail at setup with the strategy's message, not
  torch's "optimizer got an empty parameter list".
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_script

pytestmark = pytest.mark.multiprocess


def test_one_device_is_one_stage_and_equals_the_plain_trainer(tmp_path) -> None:
    result = run_script("fit_contract.py", tmp_path, "one_device", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    plain = torch.load(tmp_path / "plain.pt")
    for policy in ("pipedream_flush", "gpipe", "pipedream", "pipemare"):
        state = torch.load(tmp_path / f"{policy}.pt")
        for name, value in plain.items():
            assert torch.equal(state[name], value), (policy, name)
    delayed = torch.load(tmp_path / "pipedream_2bw.pt")
    assert max(float((delayed[k] - v).abs().max()) for k, v in plain.items()) > 1e-3


def test_two_optimizers_fail_at_setup_with_the_strategys_message(tmp_path) -> None:
    result = run_script("fit_contract.py", tmp_path, "two_optimizers", timeout=240)
    assert result.returncode != 0
    assert "configure_optimizers built an optimizer over parameters that stage" in result.output
    assert "several optimizers" in result.output and "empty parameter list" not in result.output.split("PipelineConfigError")[-1]
