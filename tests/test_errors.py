"""Bad configurations fail at setup with a clear message, before any process can hang; a stage
that fails mid-training ends every process quickly with the original error visible."""

from __future__ import annotations

import re
import uuid

import lightning as L
import pytest
import torch
from torch import nn

from lightning_asyncpipe import AsyncPipeStrategy, BalanceError, PipelineConfigError
from tests.helpers.launch import child_processes, leftover_processes, run_script
from tests.helpers.models import SeqRegressor, loader, regression_data

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores


def _trainer(devices: int = 2, **strategy: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=AsyncPipeStrategy(**strategy), max_steps=1,
                     logger=False, enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip


class NoSequential(SeqRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.ModuleList(list(self.net))  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TwoSequentials(SeqRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(4, 4))


class Manual(SeqRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def _fit_fails(model: L.LightningModule, devices: int = 2, **strategy: object) -> str:
    with pytest.raises(PipelineConfigError) as info:
        _trainer(devices, **strategy).fit(model, loader(regression_data(), 8))
    assert not child_processes(), "a process was started before the error"
    return str(info.value)


def test_more_stages_than_layers() -> None:
    message = _fit_fails(SeqRegressor(depth=2), devices=4)  # 3 layers, 4 stages
    assert "cannot split 3 layers into 4 stages" in message
    assert isinstance(pytest.raises(BalanceError, _trainer(4).fit, SeqRegressor(depth=2)).value, BalanceError)


def test_no_sequential() -> None:
    message = _fit_fails(NoSequential())
    assert "they are in the ModuleList 'net', which has no forward of its own" in message


def test_several_sequentials() -> None:
    message = _fit_fails(TwoSequentials())
    assert "['net', 'head']" in message and "sequential='net'" in message


def test_named_sequential_must_exist() -> None:
    assert "SeqRegressor.body is missing. Modules of SeqRegressor that hold parameters: ['net'" in _fit_fails(
        SeqRegressor(), sequential="body")


class _Gate(nn.Module):
    """Skips its layer for batches whose mean is negative: Python control flow on data."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() < 0:
            return x
        return self.layer(x)


def test_data_dependent_forward_fails_before_launch_naming_the_line() -> None:
    model = SeqRegressor()
    model.net.insert(2, _Gate())
    message = _fit_fails(model)  # raised in this process; no other was started
    assert "Cannot capture forward: a branch on a tensor at " in message and "test_errors.py:" in message
    assert "`if x.mean() < 0:`" in message and "leaf_modules" in message
    # the way out the message gives works: run the gate whole
    AsyncPipeStrategy(leaf_modules=["2"], stages=2)._check_module(model)


def test_split_points_name_modules_forward_runs() -> None:
    message = _fit_fails(SeqRegressor(), split_points=["9"])
    assert "split point '9' is not a module that Sequential.forward runs" in message and "'0', '1', '2'" in message
    message = _fit_fails(SeqRegressor(), split_points=["2", "4"])
    assert "gives 3 stages, but the pipeline has 2" in message


def test_parameters_outside_the_sequential() -> None:
    model = SeqRegressor()
    model.scale = nn.Parameter(torch.ones(()))
    assert "found 1 outside it: scale" in _fit_fails(model)


def test_devices_not_divisible_by_stages() -> None:
    with pytest.raises(PipelineConfigError, match=r"number of processes \(3\) to be divisible by the number of pipeline stages \(2\)"):
        _trainer(3, stages=2)


@pytest.mark.parametrize("microbatches", [0, -1, 1.5])
def test_microbatches_below_one(microbatches: object) -> None:
    with pytest.raises(PipelineConfigError, match="microbatches >= 1"):
        AsyncPipeStrategy(microbatches=microbatches)  # type: ignore[arg-type]


def test_manual_optimization() -> None:
    assert "does not support manual optimization" in _fit_fails(Manual())


def test_unknown_policy() -> None:
    with pytest.raises(PipelineConfigError, match="Unknown pipeline policy 'pipedraem'. Available policies: .*gpipe"):
        AsyncPipeStrategy(policy="pipedraem")


@pytest.mark.parametrize("option, value, message", [
    ("step_outputs", "mine", "step_outputs='latest' or 'own', got 'mine'"),
    ("eval_steps_everywhere", "yes", "eval_steps_everywhere=True or False, got 'yes'"),
])  # fmt: skip
def test_bad_output_options_fail_at_construction(option: str, value: str, message: str) -> None:
    with pytest.raises(PipelineConfigError, match=re.escape(message)):
        AsyncPipeStrategy(**{option: value})  # type: ignore[arg-type]


def _async_window_trainer(max_epochs: int) -> L.Trainer:
    """One device, pipedream_2bw with 2 micro-batches, accumulation windows of 2 batches."""
    return L.Trainer(accelerator="cpu", devices=1, strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=2),
                     accumulate_grad_batches=2, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False)  # fmt: skip


def test_an_accumulation_window_an_epoch_cannot_fill_is_refused_before_the_first_step() -> None:
    """Asynchronous policies train a window of K batches as one update: 7 batches an epoch in
    windows of 2 fail when the loader is set up (before issue 15: any K > 1 was refused)."""
    trainer = _async_window_trainer(max_epochs=1)
    with pytest.raises(PipelineConfigError, match="accumulate_grad_batches=2: an epoch trains 7 batches, not a multiple of 2"):
        trainer.fit(SeqRegressor(), loader(regression_data(56), 8))
    assert trainer.global_step == 0


def test_gradient_scaler_rejected() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = SimpleNamespace(scale=lambda loss: loss)  # stands for torch.amp.GradScaler, which needs CUDA
    strategy = AsyncPipeStrategy(precision_plugin=MixedPrecision("16-mixed", "cpu", scaler=scaler))  # type: ignore[arg-type]
    with pytest.raises(PipelineConfigError, match="does not support precision='16-mixed'"):
        strategy._check_trainer(SimpleNamespace(accumulate_grad_batches=1))  # type: ignore[arg-type]


@pytest.mark.multiprocess
def test_several_optimizers_rejected_in_launched_processes() -> None:
    message = "supports exactly one optimizer, but configure_optimizers returned several"
    token = uuid.uuid4().hex
    result = run_script("fit_faulty.py", "two-optimizers", token, timeout=90)
    assert result.returncode != 0
    assert message in result.output
    assert result.elapsed < 60
    assert not leftover_processes(token)


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["first", "last"])
def test_stage_failure_ends_every_process(where: str) -> None:
    token = uuid.uuid4().hex
    result = run_script("fit_faulty.py", f"raise-{where}", token, timeout=90)
    assert result.returncode != 0
    assert f"RuntimeError: boom from the {where} stage" in result.output
    assert result.elapsed < 60, f"took {result.elapsed:.0f} s"
    assert not leftover_processes(token)


@pytest.mark.multiprocess
def test_nan_in_activations_is_named_when_detection_is_on() -> None:
    token = uuid.uuid4().hex
    result = run_script("fit_faulty.py", "nan-first", token, timeout=90)
    assert result.returncode != 0
    # the 5th training forward on stage 0 is micro-batch 4 (2 micro-batches per step, no validation)
    assert "NonFiniteError: NaN in output of stage 0 for micro-batch 4" in result.output
    assert result.elapsed < 60
    assert not leftover_processes(token)


BAD_INPUT = {
    "unsplittable": "cannot split a batch of type Box into micro-batches",
    "small-batch": "got a batch of 8 samples, fewer than microbatches=16",
    "ragged": "ShapeError: A stage output changed shape for micro-batches of the same input shapes",
    "dict-between-stages": "Stage 0 produced dict : only a tensor or a tuple of tensors can cross a stage boundary",
    "detached": "Stage 0's output for micro-batch 0 does not require grad",
    "2bw-few-microbatches": "needs microbatches >= stages so that two weight buffers suffice, got microbatches=1 "
                            "with 2 stages. Use microbatches >= 2.",
    "pb-adamw": "Policy 'pipelined_backprop' needs torch.optim.SGD with momentum > 0",
    "other-model-checkpoint": "The checkpoint's weights do not fit SeqRegressor: it was written for another model",
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", list(BAD_INPUT))
def test_bad_input_fails_clearly_and_ends_every_process(mode: str, tmp_path) -> None:
    """Bad input met in the launched processes (the data, the stage boundary, the optimizer, the
    checkpoint): the job ends fast with the message, wherever the error arises."""
    token = uuid.uuid4().hex
    result = run_script("fit_faulty.py", mode, token, timeout=90, env={"TMPDIR": str(tmp_path)})
    assert result.returncode != 0
    assert BAD_INPUT[mode] in result.output, result.output[-3000:]
    assert result.elapsed < 60
    assert not leftover_processes(token)


def test_2bw_with_too_few_microbatches_fails_before_launch() -> None:
    message = _fit_fails(SeqRegressor(), devices=2, policy="pipedream_2bw", microbatches=1)
    assert "Use microbatches >= 2" in message


@pytest.mark.multiprocess
def test_timeout_is_configurable_and_ends_a_stalled_pipeline() -> None:
    """timeout=15 s (as DDPStrategy's ``timeout``): stage 0 hangs for 120 s, the last stage gives up
    waiting for its activations after 15 s and the job ends, naming the stage it waited for."""
    token = uuid.uuid4().hex
    result = run_script("fit_faulty.py", "stall", token, timeout=90)
    assert result.returncode != 0
    assert "StageFailure: The transfer with stage 0 (rank 1) failed" in result.output, result.output[-3000:]
    assert result.elapsed < 60, f"took {result.elapsed:.0f} s: the 15 s timeout did not apply"
    assert not leftover_processes(token)


def test_an_asynchronous_window_left_by_an_ended_epoch_is_dropped_with_a_warning() -> None:
    """``on_train_batch_start`` returning -1 ends an epoch inside a window of 2 (after batch 2): the
    next epoch starts a whole window and says what it dropped, instead of failing an epoch later."""

    class EndEarly(SeqRegressor):
        def on_train_batch_start(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return -1 if self.current_epoch == 0 and batch_idx == 3 else None

    trainer = _async_window_trainer(max_epochs=2)
    with pytest.warns(UserWarning, match="that window's batches are dropped"):
        trainer.fit(EndEarly(), loader(regression_data(48), 8))
    assert trainer.current_epoch == 2


def test_an_accumulation_schedule_is_refused_under_an_asynchronous_policy_before_any_update() -> None:
    """Lightning's GradientAccumulationScheduler changes accumulate_grad_batches at epoch starts; an
    asynchronous policy sized its update (K x microbatches micro-batches) at setup, so a changed K
    is refused at the first batch that sees it, before any update."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=2),
                        callbacks=[GradientAccumulationScheduler({0: 2})], max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(PipelineConfigError, match="accumulate_grad_batches changed from 1 to 2 during training"):
        trainer.fit(SeqRegressor(), loader(regression_data(48), 8))
    assert trainer.global_step == 0


def test_skipping_inside_an_asynchronous_accumulation_window_is_refused_at_once() -> None:
    class Skipping(SeqRegressor):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    trainer = _async_window_trainer(max_epochs=1)
    with pytest.raises(PipelineConfigError, match="skipping a batch.*accumulate_grad_batches=2"):
        trainer.fit(Skipping(), loader(regression_data(48), 8))
    assert trainer.global_step == 0
