"""A checkpoint written by N stages resumes on M stages (2 -> 4 and 4 -> 2) to the same weights as
an uninterrupted run, and loads into a plain single-process module (optimizer state and policy
state travel by parameter name). Checked for the synchronous policy and for PipeDream-2BW, whose
result does not depend on the number of stages (its resumed run needs the stashed version), on a
Sequential regressor and on a nanoGPT whose head is tied to its embedding (the tie's owner and
holder change processes between the layouts)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor
from tests.helpers.zoo import GPTModule

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores


POLICIES = ["pipedream_flush", "pipedream_2bw", "gpt+pipedream_2bw"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Three launches for both policies: 2 stages (uninterrupted; first epoch), 4 stages (first
    epoch; resume of the 2-stage checkpoint), 2 stages (resume of the 4-stage checkpoint)."""
    out = tmp_path_factory.mktemp("layouts")
    for devices, modes in [(2, ["straight", "first"]), (4, ["first", "resume:first-2/last.ckpt"]),
                           (2, ["resume:first-4/last.ckpt"])]:  # fmt: skip
        result = run_script("fit_resume_stages.py", out, devices, *[f"{p}:{m}" for p in POLICIES for m in modes],
                            timeout=240)  # fmt: skip
        assert result.returncode == 0, result.output[-5000:]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", POLICIES)
def test_checkpoints_move_between_stage_counts(runs, policy: str) -> None:
    out = runs / policy
    for devices, source in [(4, 2), (2, 4)]:
        straight, resumed = torch.load(out / "straight.pt"), torch.load(out / f"resumed-to-{devices}.pt")
        for name in straight:
            assert torch.equal(resumed[name], straight[name]), f"{source}->{devices}: {name}"
    saved = torch.load(out / "first-4" / "last.ckpt", weights_only=False)
    module_class = GPTModule if policy.startswith("gpt+") else SeqRegressor
    plain = module_class.load_from_checkpoint(out / "first-4" / "last.ckpt")
    # AdamW state of every parameter (the tied one once), in one file
    assert len(saved["optimizer_states"][0]["state"]) == len(list(plain.parameters()))
    assert sum(p.numel() for _, p in plain.named_parameters(remove_duplicate=False)) == \
        sum(v.numel() for v in saved["state_dict"].values())  # fmt: skip
    if module_class is GPTModule:
        assert plain.model.lm_head.weight is plain.model.transformer.wte.weight
