"""Exact mid-epoch resume for every policy (issue 6, point 1), and from an epoch's end.

One launch trains each policy for 14 steps (3 stages, 3 micro-batches, 6 shuffled batches an
epoch, StepLR) with ModelCheckpoint(every_n_train_steps=4); a second launch, in fresh processes,
resumes each from a mid-epoch checkpoint (step 4: batch 4 of epoch 0, or step 8: batch 2 of epoch
1) and must end with the weights of the uninterrupted run. ``pipedream_2bw_epochs`` trains 3 epochs
(no ``max_steps``) with a checkpoint at each epoch's end and resumes from the first: Lightning
does not restore a loader's state when the checkpoint's epoch is finished, and before the strategy
restored it the resumed epochs drew epoch 0's order again. Both runs checkpoint at the same steps:
a checkpoint drains the pipeline (docs/user_guide.md), so the drain is part of the run. Two
controls resume from doctored checkpoints and must differ: without the data position (the
epoch's batches start over) and without PipeMare's policy state (velocity, update counter).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.launch import run_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

CASES = ["pipedream_flush", "pipedream", "pipedream_vsync", "pipedream_2bw", "pipemare", "pipelined_backprop",
         "pipedream_2bw_epochs"]  # fmt: skip
RESUME_STEP = {name: 4 if i % 2 == 0 else 8 for i, name in enumerate(CASES)}
RESUME_STEP["pipedream_2bw_epochs"] = 6  # the end of epoch 0, in epoch-based training
CKPT = {4: "epoch=0-step=4.ckpt", 8: "epoch=1-step=8.ckpt", 6: "epoch=0-step=6.ckpt"}


def _doctor(src, dst, drop) -> None:
    ckpt = torch.load(src, weights_only=False)
    drop(ckpt)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("resume_exact")
    result = run_script("fit_resume_exact.py", out, "full", timeout=300)
    assert result.returncode == 0, result.output[-5000:]
    for name in CASES:
        shutil.copy(out / name / "ckpt" / CKPT[RESUME_STEP[name]], out / name / "resume_from.ckpt")
    _doctor(out / "pipedream_flush" / "resume_from.ckpt", out / "no_data_position" / "resume_from.ckpt",
            lambda c: c["loops"]["fit_loop"]["state_dict"].pop("combined_loader"))  # fmt: skip
    _doctor(out / "pipemare" / "resume_from.ckpt", out / "no_policy_state" / "resume_from.ckpt",
            lambda c: c.pop("asyncpipe"))  # fmt: skip
    controls = ["pipedream_flush=no_data_position", "pipemare=no_policy_state"]
    result = run_script("fit_resume_exact.py", out, "resume", *CASES, *controls, timeout=420)
    assert result.returncode == 0, result.output[-5000:]
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", CASES)
def test_resumed_run_ends_with_the_uninterrupted_weights(runs, name: str) -> None:
    full, resumed = torch.load(runs / name / "full.pt"), torch.load(runs / name / "resumed.pt")
    for key in full:  # the same arithmetic in the same order on both sides: bitwise
        assert torch.equal(resumed[key], full[key]), f"{name}: {key}"
    start = torch.load(runs / name / "resume_from.ckpt", weights_only=False)["state_dict"]
    assert _max_diff(full, start) > 1e-3  # the resumed part did train


@pytest.mark.multiprocess
def test_checkpoint_holds_policy_state_and_data_position(runs) -> None:
    two_bw = torch.load(runs / "pipedream_2bw" / "resume_from.ckpt", weights_only=False)
    assert two_bw["asyncpipe"]["step"] == two_bw["asyncpipe"]["updates"] == RESUME_STEP["pipedream_2bw"]
    # batch k+1 still uses W(k): the version before the last update is kept, for every layer
    kept = f"stash.{RESUME_STEP['pipedream_2bw'] - 1}"
    assert set(two_bw["asyncpipe"]["tensors"]) == {kept}
    assert {"net." + n for n in two_bw["asyncpipe"]["tensors"][kept]} == set(two_bw["state_dict"])
    pipemare = torch.load(runs / "pipemare" / "resume_from.ckpt", weights_only=False)
    velocity = pipemare["asyncpipe"]["tensors"]["velocity"]
    # stages 0 and 1 (layers 0-4) have a delay of one update; the last stage (layers 5-6) none
    assert {"net." + n for n in velocity} == {k for k in pipemare["state_dict"] if not k.startswith("net.6.")}
    position = pipemare["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["batches"] == RESUME_STEP["pipemare"] % 6 and "generator" in position


@pytest.mark.multiprocess
@pytest.mark.parametrize("control, source", [("no_data_position", "pipedream_flush"), ("no_policy_state", "pipemare")])
def test_controls_without_that_state_do_not_resume_exactly(runs, control: str, source: str) -> None:
    full, resumed = torch.load(runs / source / "full.pt"), torch.load(runs / control / "resumed.pt")
    assert _max_diff(full, resumed) > 1e-5  # ten times the tolerance of the exact-resume test
