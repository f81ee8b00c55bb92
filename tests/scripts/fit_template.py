"""Fit the lightning-hydra-template-style module and DataModule (tests/helpers/template.py)
unchanged, with the template's callbacks (ModelCheckpoint and EarlyStopping monitoring validation
metrics, LearningRateMonitor) and a CSV logger; every rank writes what it saw to
OUT_DIR/<policy>-rank<r>.json and rank 0 the final weights to OUT_DIR/<policy>.pt.

Usage: python fit_template.py OUT_DIR DEVICES POLICY [POLICY ...]
(POLICY "plain", after pipedream_flush: the one-device reference of fit's docstring, in the
launching process only)
"""

import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.template import MNISTDataModule, MNISTLitModule, SimpleDenseNet  # noqa: E402

torch.set_num_threads(1)
BATCH, MICROBATCHES = 16, 4


def _debug():
    if os.environ.get("DBG"):
        sys.path.insert(0, "/tmp")
        from dbgcb import Dbg
        return [Dbg()]
    return []


class SameOrder(MNISTDataModule):
    """The reference's DataModule: the training sampler draws its orders from a generator seeded
    with the pipelined run's data seed (what the strategy gives every stage's sampler)."""

    def __init__(self, data_seed: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.data_seed = data_seed

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        loader = super().train_dataloader()
        loader.sampler.generator = torch.Generator().manual_seed(self.data_seed)
        return loader


def fit(out: str, devices: int, policy: str) -> None:
    """``policy`` "plain": one device, batches of one micro-batch's rows and accumulate_grad_batches
    = MICROBATCHES (ordinary training over the same micro-batches: GPipe's definition, which
    BatchNorm makes differ from whole batches), in the order of pipedream_flush's run."""
    plain = policy == "plain"
    if plain and torch.distributed.is_initialized():
        # Every process of the pipelined fits runs this script on: one device means one process,
        # outside their world (two would race on the same checkpoint files, and torchmetrics would
        # gather over the old world).
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    L.seed_everything(7)
    net = SimpleDenseNet(input_size=784, lin1_size=32, lin2_size=32, lin3_size=32, output_size=10)
    # The template's Adam, but SGD with momentum for the pair compared with one device: the bias of a
    # Linear followed by BatchNorm has a zero gradient, i.e. rounding noise (~1e-9), which Adam
    # turns into full steps of size lr, so no two float32 runs (two BLAS) agree there under Adam.
    compared = plain or policy == "pipedream_flush"
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9) if compared else \
        functools.partial(torch.optim.Adam, lr=0.01, weight_decay=0.0)  # fmt: skip
    model = MNISTLitModule(net, optimizer=optimizer,
                           scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min",
                                                       factor=0.1, patience=10))  # fmt: skip
    if plain:
        with open(os.path.join(out, "pipedream_flush-rank0.json")) as f:
            seed = json.load(f)["data_seed"]
        datamodule: MNISTDataModule = SameOrder(seed, batch_size=BATCH // MICROBATCHES)
    else:
        datamodule = MNISTDataModule(batch_size=BATCH)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(out, f"ckpt-{policy}"), monitor="val/acc", mode="max",
                                 save_last=True, auto_insert_metric_name=False)  # fmt: skip
    early = EarlyStopping(monitor="val/loss", patience=100, mode="min")
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if plain else devices, accumulate_grad_batches=MICROBATCHES if plain else 1,
        strategy="auto" if plain else AsyncPipeStrategy(policy=policy, microbatches=MICROBATCHES),
        max_epochs=2, logger=CSVLogger(os.path.join(out, f"logs-{policy}")), log_every_n_steps=1,
        callbacks=[checkpoint, early, LearningRateMonitor(logging_interval="epoch")] + _debug(),
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        precision="64-true" if compared else "32-true",
    )  # fmt: skip
    trainer.fit(model=model, datamodule=datamodule)
    trainer.save_checkpoint(os.path.join(out, f"final-{policy}.ckpt"))  # every rank: a collective
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(model=model, datamodule=datamodule, ckpt_path=None)
    seen = {
        "rank": trainer.global_rank,
        "fit_metrics": fit_metrics,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "best_model_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_model_path": os.path.basename(checkpoint.best_model_path),
        "batch_size_per_device": datamodule.batch_size_per_device,
        "val_acc_best": float(model.val_acc_best.compute()),
        "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
        "data_seed": getattr(trainer.strategy, "_data_seed", None),
        "global_step": trainer.global_step,
    }
    with open(os.path.join(out, f"{policy}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(seen, f)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(out, f"{policy}.pt"))


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    for policy in sys.argv[3:]:
        fit(out, devices, policy)


if __name__ == "__main__":
    main()

