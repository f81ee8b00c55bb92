"""3-stage runs with validation, ModelCheckpoint(monitor="val_loss"), EarlyStopping, predict, and
resume: the multi-process side of tests/test_checkpoint_lightning.py.

Usage: python fit_checkpoint.py OUT_DIR
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)
DEVICES = 3


def trainer(out: str, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=DEVICES, strategy=AsyncPipeStrategy(policy="pipedream_flush", microbatches=2),
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out, **kwargs,
    )  # fmt: skip


def main() -> None:
    out = sys.argv[1]
    train, val = loader(regression_data(48), 8), loader(regression_data(16, seed=1), 8)

    # 1. monitor val_loss, early stopping, then predict with the best checkpoint
    L.seed_everything(3)
    model = SeqRegressor(optimizer="adamw", lr=0.02, depth=4)
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "best"), monitor="val_loss", save_top_k=1)
    stop = EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0)  # stops after 2 epochs
    t = trainer(out, max_epochs=5, callbacks=[ckpt, stop])
    t.fit(model, train, val)
    seen = {"rank": t.global_rank, "val_loss": float(t.callback_metrics["val_loss"]), "epochs": t.current_epoch,
            "best": ckpt.best_model_path, "stopped": stop.stopped_epoch}  # fmt: skip
    with open(os.path.join(out, f"rank{t.global_rank}.json"), "w") as f:
        json.dump(seen, f)
    predictions = t.predict(model, loader(regression_data(16, seed=2), 4), ckpt_path="best")
    validated = t.validate(model, val, ckpt_path="best")
    tested = t.test(model, val, ckpt_path="best")
    if t.global_rank == 0:
        torch.save(torch.cat(predictions), os.path.join(out, "predictions.pt"))
        with open(os.path.join(out, "evaluated.json"), "w") as f:
            json.dump({"validate": validated, "test": tested}, f)

    # 2. three epochs straight vs two epochs, then resume to three
    for name, epochs, resume in [("straight", 3, None), ("first", 2, None), ("resumed", 3, "first/last.ckpt")]:
        L.seed_everything(5)
        model = SeqRegressor(optimizer="sgd", lr=0.05, depth=4)
        last = ModelCheckpoint(dirpath=os.path.join(out, name), save_last=True, save_top_k=0)
        t = trainer(out, max_epochs=epochs, callbacks=[last], limit_val_batches=0, num_sanity_val_steps=0)
        t.fit(model, train, ckpt_path=None if resume is None else os.path.join(out, resume))
        if t.global_rank == 0:
            torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))


if __name__ == "__main__":
    main()
