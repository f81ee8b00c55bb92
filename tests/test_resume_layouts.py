"""A checkpoint written by N stages resumes on M stages (2 -> 4 and 4 -> 2) to the same weights as
an uninterrupted run, and loads into a plain single-process module (optimizer state and policy
state travel by parameter name). Checked for the synchronous policy and for PipeDream-2BW, whose
result does not depend on the number of stages (its resumed run needs the stashed version)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", ["pipedream_flush", "pipedream_2bw"])
def test_checkpoints_move_between_stage_counts(tmp_path, policy: str) -> None:
    for args in [(2, "straight"), (2, "first"), (4, "first")]:
        result = run_script("fit_resume_stages.py", tmp_path, policy, *args, timeout=180)
        assert result.returncode == 0, result.output[-5000:]
    for devices, source in [(4, 2), (2, 4)]:
        ckpt = tmp_path / f"first-{source}" / "last.ckpt"
        result = run_script("fit_resume_stages.py", tmp_path, policy, devices, "resume", ckpt, timeout=180)
        assert result.returncode == 0, result.output[-5000:]
        straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / f"resumed-to-{devices}.pt")
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0, msg=f"{source}->{devices}")
    saved = torch.load(tmp_path / "first-4" / "last.ckpt", weights_only=False)
    assert len(saved["optimizer_states"][0]["state"]) == 10  # AdamW state of all 10 parameters, one file
    plain = SeqRegressor.load_from_checkpoint(tmp_path / "first-4" / "last.ckpt")
    assert sum(p.numel() for p in plain.parameters()) == sum(v.numel() for v in saved["state_dict"].values())
