"""A lightning-hydra-template-style project (tests/helpers/template.py: MNISTLitModule with its
net passed to ``__init__`` and saved in the hyper-parameters, torchmetrics objects logged with
``self.log``, ``sync_dist=True`` in ``on_validation_epoch_end``, ReduceLROnPlateau monitoring
``val/loss``; a DataModule dividing the batch size by ``trainer.world_size``) with the template's
callbacks (ModelCheckpoint and EarlyStopping monitoring validation metrics, LearningRateMonitor),
fit then tested unchanged on 2 stages, for a synchronous and an asynchronous policy.

Before issue 15 this aborted (``sync_dist``: a world all-reduce the other stage never entered;
metric ``compute()`` gathering over the world) or trained on half batches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.launch import run_script

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # this file takes 40 s or more on 2 cores
POLICIES = ["pipedream_flush", "pipedream_2bw"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("template")
    result = run_script("fit_template.py", folder, 2, *POLICIES, "plain", timeout=300)
    assert result.returncode == 0, result.output[-5000:]
    (folder / "output.txt").write_text(result.output)
    return folder


def test_no_advice_to_sync_across_devices_with_one_replica(out) -> None:
    """Lightning advises ``sync_dist=True`` for epoch-level tensors whenever torch.distributed is
    up; with one replica the stages hold one batch between them, nothing to accumulate across
    processes, and the template's ``sync_dist=True`` value got the advice too."""
    output = (out / "output.txt").read_text()
    assert "It is recommended to use `self.log(" not in output


def _seen(out, policy: str) -> list[dict]:
    return [json.loads((out / f"{policy}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_stage_sees_the_same_metrics_and_monitored_scores(out, policy: str) -> None:
    seen = _seen(out, policy)
    for key in ("fit_metrics", "callback_metrics"):
        # every rank, bit for bit (but the pipeline's own per-process measurement of throughput)
        mine = [{k: v for k, v in s[key].items() if k != "pipeline/samples_per_sec"} for s in seen]
        assert mine[0] == mine[1], key
    fit = seen[0]["fit_metrics"]
    # metric objects (train/acc, val/acc ...), a sync_dist value and ordinary ones, all finite
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"} <= fit.keys()
    assert all(math.isfinite(v) for v in fit.values())
    assert {"test/loss", "test/acc"} <= seen[0]["callback_metrics"].keys()
    # ModelCheckpoint(monitor="val/acc") agrees on its best score and file; the template's own
    # MaxMetric tracks the same best
    assert seen[0]["best_model_score"] == seen[1]["best_model_score"] == fit["val/acc_best"]
    assert seen[0]["best_model_path"] == seen[1]["best_model_path"] != ""
    assert seen[0]["val_acc_best"] == seen[1]["val_acc_best"] == fit["val/acc_best"]
    assert seen[0]["lr"] == seen[1]["lr"]  # ReduceLROnPlateau on val/loss steps alike


@pytest.mark.parametrize("policy", POLICIES)
def test_the_datamodule_gives_each_pipeline_the_whole_batch(out, policy: str) -> None:
    """``batch_size // trainer.world_size`` counts data-parallel replicas, not stages."""
    assert [s["batch_size_per_device"] for s in _seen(out, policy)] == [16, 16]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_checkpoint_loads_into_a_plain_module(out, policy: str) -> None:
    """The net in the hyper-parameters is pickled whole (as one device would), so
    ``load_from_checkpoint`` rebuilds the module without the strategy, with the final weights."""
    from tests.helpers.template import MNISTLitModule

    final = torch.load(out / f"{policy}.pt")
    # the template pickles its net in the hyper-parameters: not a weights-only file, on one device too
    plain = MNISTLitModule.load_from_checkpoint(out / f"final-{policy}.ckpt", weights_only=False)
    state = plain.state_dict()
    assert state.keys() == final.keys()
    for name, value in final.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name  # flush trains in float64
    assert type(plain.net.model).__name__ == "Sequential"


@pytest.mark.parametrize("policy", POLICIES)
def test_a_checkpoint_written_during_fit_loads_into_a_plain_module(out, policy: str) -> None:
    """Written by ModelCheckpoint while the net is split over the stages: the hyper-parameters
    still hold the whole net (with the checkpoint's weights), not this stage's part."""
    from tests.helpers.template import MNISTLitModule

    path = out / f"ckpt-{policy}" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    net = saved["hyper_parameters"]["net"]
    assert type(net.model).__name__ == "Sequential" and not any(t.is_meta for t in net.state_dict().values())
    plain = MNISTLitModule.load_from_checkpoint(path, weights_only=False)
    for name, value in saved["state_dict"].items():
        loaded = plain.state_dict()[name]  # a float32 module (flush trains in float64)
        assert torch.equal(loaded, value.to(loaded.dtype)), name
        assert torch.equal(net.state_dict()[name[len("net."):]], value), name  # float64 kept float64


def test_a_synchronous_policy_equals_one_device_on_the_same_microbatches(out) -> None:
    """Weights and monitored scores of pipedream_flush equal one device trained on the same
    micro-batches (batches of 4 rows with accumulate_grad_batches=4, since BatchNorm normalizes over
    each micro-batch) in the same order (the pipelined run's data seed), both in float64
    (``precision="64-true"``) and with SGD (see fit_template.py). Measured: max 5.4e-12 (a BatchNorm
    running_var of magnitude 226), i.e. float64 rounding. Before, the other stages' layers came back
    to the last stage's module in float32 (rounded to 1e-8)."""
    from tests.helpers.tolerance import training_atol64

    piped, plain = _seen(out, "pipedream_flush")[0], json.loads((out / "plain-rank0.json").read_text())
    assert piped["global_step"] == plain["global_step"] == 12  # 96 samples / 16, 2 epochs
    state, reference = torch.load(out / "pipedream_flush.pt"), torch.load(out / "plain.pt")
    atol = training_atol64(reference, 12 * 4)  # BatchNorm's running statistics: an update per micro-batch
    for name, value in reference.items():
        assert state[name].dtype == value.dtype, name
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, atol=atol, rtol=0, msg=name)
        else:
            assert torch.equal(state[name], value), name  # BatchNorm's num_batches_tracked
    for key in ("val/loss", "val/acc", "val/acc_best", "train/loss", "train/acc"):
        assert piped["fit_metrics"][key] == pytest.approx(plain["fit_metrics"][key], abs=1e-5), key
    assert piped["best_model_score"] == pytest.approx(plain["best_model_score"], abs=1e-5)
    assert piped["best_model_path"] == plain["best_model_path"] and piped["lr"] == plain["lr"]
