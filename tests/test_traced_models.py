"""Modules written the usual way, pipelined unchanged (issue 14): a nanoGPT-style GPT (a
``ModuleList`` of blocks inside a ``ModuleDict``, the LM head tied to the token embedding, the
loss computed in the model's forward from ``targets``) under gpipe and pipedream_flush on 2, 3
and 4 processes equals a plain one-device Trainer: weights (the tied pair included, one
parameter) and logged losses, after 6 steps of AdamW with weight decay and gradient clipping.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.reference import train_losses
from tests.helpers.tolerance import loss_atol, training_atol

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

POLICIES = ["gpipe", "pipedream_flush"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gpt-reference")
    result = run_script("fit_zoo.py", out, "gpt", 0, "none", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    return torch.load(out / "gpt-0-none.pt"), train_losses(json.loads((out / "gpt-0-none.json").read_text()))


@pytest.mark.multiprocess
@pytest.mark.parametrize("devices", [2, 3, 4])
def test_gpt_with_tied_head_equals_one_device(tmp_path, reference, devices: int) -> None:
    result = run_script("fit_zoo.py", tmp_path, "gpt", devices, *POLICIES, timeout=300)
    assert result.returncode == 0, result.output[-5000:]
    expected, expected_losses = reference
    for policy in POLICIES:
        weights = torch.load(tmp_path / f"gpt-{devices}-{policy}.pt")
        assert weights.keys() == expected.keys()
        # the head and the embedding are one parameter, on the first and on the last stage
        assert torch.equal(weights["model.lm_head.weight"], weights["model.transformer.wte.weight"]), policy
        atol = training_atol(expected, steps=6)  # micro-batches reorder float32 sums: tolerance.py
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{devices} {policy}: {name}")
        losses = train_losses(json.loads((tmp_path / f"gpt-{devices}-{policy}.json").read_text()))
        assert len(losses) == 6 and losses == pytest.approx(expected_losses, abs=loss_atol(expected_losses, 6)), policy
    start = _initial()
    assert max(float((expected[k] - start[k]).abs().max()) for k in expected) > 1e-3  # training moved the weights


def _initial() -> dict[str, torch.Tensor]:
    import lightning as L

    from tests.helpers.zoo import GPTModule

    L.seed_everything(3)
    return GPTModule().state_dict()
