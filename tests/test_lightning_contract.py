"""Lightning's contract under the strategy (issue 15): ``devices=1``, several optimizers, a short
last batch, gradient accumulation.

- ``devices=1`` is one stage: the same code path, and (with one micro-batch) bitwise the plain
  one-device Trainer for every policy without a delay on one stage; PipeDream-2BW keeps its
  one-update delay by definition. Before issue 15 it crashed with "IndexError: invalid index of a
  0-dim tensor" (the pipeline metrics of a single stage).
- Two optimizers over layers of different stages fail at setup with the strategy's message, not
  torch's "optimizer got an empty parameter list".
- ``accumulate_grad_batches=K`` with a synchronous policy: one update per K batches (and after an
  epoch's last batch), equal to the plain Trainer with the same K.
- Callbacks' ``outputs`` on every rank: the step's own loss under synchronous policies.
- A batch smaller than ``microbatches``: fewer micro-batches under synchronous policies (equal to
  the plain Trainer), and in evaluation; with an asynchronous policy a training loader whose last
  batch is that small fails when the loader is set up, before the first step.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.tolerance import training_atol

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


def test_a_batch_smaller_than_microbatches_runs_on_fewer_under_synchronous_policies(tmp_path) -> None:
    """A last batch of 2 samples with 4 micro-batches (training and validation): 2 micro-batches,
    equal to the plain Trainer. Before issue 15 the run stopped at the end of the first epoch."""
    result = run_script("fit_contract.py", tmp_path, "ragged", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    plain = torch.load(tmp_path / "plain.pt")
    assert plain["steps"] == 14
    for policy in ("pipedream_flush", "gpipe"):
        run = torch.load(tmp_path / f"{policy}.pt")
        assert run["steps"] == plain["steps"], policy
        atol = training_atol(plain["state"], 14)
        for name, value in plain["state"].items():
            torch.testing.assert_close(run["state"][name], value, atol=atol, rtol=0, msg=f"{policy}: {name}")
        assert run["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


def test_a_last_batch_smaller_than_microbatches_fails_before_the_first_step_when_asynchronous(tmp_path) -> None:
    """An asynchronous stream needs the same micro-batches every step: refused when the loader is set
    up, not at the end of the first epoch after all its work."""
    result = run_script("fit_contract.py", tmp_path, "ragged_async", timeout=240)
    assert result.returncode != 0
    assert "the training loader's last batch holds 2 sample(s) (50 samples in batches of 8)" in result.output
    assert "drop_last=True" in result.output and "global_step=0" in result.output


def test_accumulate_grad_batches_equals_the_plain_trainer_for_synchronous_policies(tmp_path) -> None:
    """Before issue 15: refused at setup."""
    result = run_script("fit_contract.py", tmp_path, "accumulate", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    plain = torch.load(tmp_path / "plain.pt")
    assert plain["steps"] == 6  # 7 batches per epoch, K=3: after batches 3, 6, 7, twice
    import lightning as L

    from tests.helpers.models import SeqRegressor

    L.seed_everything(0)
    initial = SeqRegressor(optimizer="adamw", lr=0.02, depth=4).state_dict()
    assert max(float((plain["state"][k] - v).abs().max()) for k, v in initial.items()) > 1e-2  # it trained
    for policy in ("pipedream_flush", "gpipe"):
        run = torch.load(tmp_path / f"{policy}.pt")
        assert run["steps"] == plain["steps"], policy
        atol = training_atol(plain["state"], 2 * 7)  # micro-batched sums, deferred weight gradients
        for name, value in plain["state"].items():
            torch.testing.assert_close(run["state"][name], value, atol=atol, rtol=0, msg=f"{policy}: {name}")


def test_callbacks_on_every_rank_get_the_steps_own_output_under_synchronous_policies(tmp_path) -> None:
    """``on_train_batch_end(outputs=...)`` on the first stage's process got the loss of an earlier
    step (NaN at first) before issue 15. Synchronous policies now give every rank the step's own
    loss (the last stage has finished the step's losses before another stage finishes its
    backward); asynchronous ones keep it two steps late there (no stage waits for the last one),
    unless ``step_outputs="own"``."""
    import json

    result = run_script("fit_contract.py", tmp_path, "outputs", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    seen = {name: [json.loads((tmp_path / f"outputs-{name}-rank{r}.json").read_text()) for r in range(n)]
            for name, n in (("plain", 1), ("pipedream_flush", 2), ("pipedream_2bw", 2), ("pipedream_2bw_own", 2))}  # fmt: skip
    plain = seen["plain"][0]
    assert len(plain) == 6
    flush = seen["pipedream_flush"]
    assert flush[0] == flush[1]  # every rank, bit for bit
    assert flush[0] == pytest.approx(plain, rel=1e-5)  # the single-device losses (micro-batched sums)
    last, first = seen["pipedream_2bw"]  # rank 0 holds the last stage
    assert last == pytest.approx(plain[:1] + last[1:]) and last[0] == plain[0]  # its own, at once
    # the others: two steps late (the newest payload is left in flight so that nothing waits)
    assert first[2:] == last[:-2] and all(math.isnan(x) for x in first[:2])
    # step_outputs="own": every rank waits for the step's own (the same losses as without waiting)
    own = seen["pipedream_2bw_own"]
    assert own[0] == own[1] == last


def test_a_training_step_returning_none_skips_the_batch_on_every_stage(tmp_path) -> None:
    """Lightning's way to skip a batch (``return None`` before the model call). Before issue 15 the
    run stopped mid-epoch. Synchronous policies equal the plain Trainer, with and without gradient
    accumulation (a skipped batch ending a window still steps the optimizer, as Lightning does);
    an asynchronous run equals the same policy on the loader without the skipped batches."""
    result = run_script("fit_contract.py", tmp_path, "skip", timeout=300)
    assert result.returncode == 0, result.output[-5000:]
    runs = {name: torch.load(tmp_path / f"{name}.pt") for name in
            ("plain", "pipedream_flush", "plain_acc", "gpipe_acc", "pipedream_2bw", "pipedream_2bw_kept")}  # fmt: skip
    import lightning as L

    from tests.helpers.models import SeqRegressor

    L.seed_everything(0)
    initial = SeqRegressor(optimizer="adamw", lr=0.02, depth=4).state_dict()
    for plain, piped in (("plain", "pipedream_flush"), ("plain_acc", "gpipe_acc")):
        assert runs[piped]["steps"] == runs[plain]["steps"], piped
        state = runs[plain]["state"]
        assert max(float((state[k] - v).abs().max()) for k, v in initial.items()) > 1e-2  # it trained
        atol = training_atol(state, 12)
        for name, value in state.items():
            torch.testing.assert_close(runs[piped]["state"][name], value, atol=atol, rtol=0, msg=f"{piped}: {name}")
    skipped, kept = runs["pipedream_2bw"]["state"], runs["pipedream_2bw_kept"]["state"]
    for name, value in kept.items():
        assert torch.equal(skipped[name], value), name  # the same computations, bit for bit
    # the nanoGPT's tied head (wte on stage 0, lm_head on stage 1, a mirror kept in step by the
    # policy's updates): the skipped batch 5 ends a window, whose update must still reach both
    from tests.helpers.zoo import GPTModule

    L.seed_everything(0)
    initial = GPTModule().state_dict()
    plain, piped = torch.load(tmp_path / "gpt_plain_acc.pt"), torch.load(tmp_path / "gpt_gpipe_acc.pt")
    assert piped["steps"] == plain["steps"] == 6  # 3 windows an epoch, the last one's batch 5 skipped
    state = plain["state"]
    assert max(float((state[k] - v).abs().max()) for k, v in initial.items()) > 1e-2  # it trained
    atol = training_atol(state, 6)
    for name, value in state.items():
        torch.testing.assert_close(piped["state"][name], value, atol=atol, rtol=0, msg=f"gpt gpipe: {name}")
    assert torch.equal(piped["state"]["model.lm_head.weight"], piped["state"]["model.transformer.wte.weight"])


def test_accumulate_grad_batches_under_an_asynchronous_policy_is_one_batch_of_k_times_the_microbatches(tmp_path) -> None:
    """An asynchronous policy trains a window of K batches as one update of K x microbatches
    micro-batches (reference.py): 2BW with K=2 on batches of 8 (2 micro-batches each) is bit for
    bit 2BW on the same data in batches of 16 (4 micro-batches), whose equality with the spec the
    engine tests prove. Before issue 15: refused at setup."""
    result = run_script("fit_contract.py", tmp_path, "accumulate_async", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    window, merged = torch.load(tmp_path / "window.pt"), torch.load(tmp_path / "merged.pt")
    assert window["steps"] == merged["steps"] == 8  # 8 batches of 8 per epoch: 4 updates, 2 epochs
    import lightning as L

    from tests.helpers.models import SeqRegressor

    L.seed_everything(0)
    initial = SeqRegressor(optimizer="adamw", lr=0.02, depth=4).state_dict()
    assert max(float((merged["state"][k] - v).abs().max()) for k, v in initial.items()) > 1e-2  # it trained
    for name, value in merged["state"].items():
        assert torch.equal(window["state"][name], value), name



def test_epoch_end_hooks_see_every_step_output_on_every_rank(tmp_path) -> None:
    """A list filled after the model call in validation_step / test_step and read at epoch end: on
    every rank the same outputs as the plain Trainer (before: empty on the first stage, whose step
    stopped at the call, so ``torch.cat`` failed there); ``all_gather`` gathers over data-parallel
    replicas, not over the stages (one replica: the tensor itself, as on one device; before: stacked
    once per stage)."""
    import json

    result = run_script("fit_contract.py", tmp_path, "eval_outputs", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    plain = json.loads((tmp_path / "eval-plain-rank0.json").read_text())
    # sanity check (2 batches), 2 epochs, then test: 20 samples in batches of 8, 8, 4
    assert [(s["kind"], s["n"], s["gathered"]) for s in plain] == [("val", 16, [16])] + [("val", 20, [20])] * 2 + [
        ("test", 20, [20])]  # fmt: skip
    for policy in ("pipedream_flush", "pipedream_2bw"):
        ranks = [json.loads((tmp_path / f"eval-{policy}-rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1], policy
        assert [(s["kind"], s["n"]) for s in ranks[0]] == [(s["kind"], s["n"]) for s in plain], policy
        assert all(s["gathered"] == [s["n"]] for s in ranks[0]), policy  # one replica: as on one device
    flush = json.loads((tmp_path / "eval-pipedream_flush-rank1.json").read_text())
    for a, b in zip(flush, plain):  # synchronous: the same model, so the same errors and step returns
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5, abs=1e-7), (a, b)
        assert a["returned"] == pytest.approx(b["returned"], rel=1e-5, abs=1e-7), (a, b)
    assert [len(s["returned"]) for s in plain] == [2, 3, 3, 0]  # validation batches; none in test
    # eval_steps_everywhere=False: no transfer of the outputs, the list is filled on the last stage only
    last, first = (json.loads((tmp_path / f"eval-pipedream_flush_last-rank{r}.json").read_text()) for r in range(2))
    assert [s["n"] for s in last] == [s["n"] for s in plain] and all(s["n"] == 0 for s in first)
