"""Checkpoints move between pipeline layouts: train with N stages, resume with M.

Usage: python fit_resume_stages.py OUT_DIR DEVICES JOB [JOB ...]
  JOB is POLICY:MODE or POLICY:resume:CKPT (paths relative to OUT_DIR/POLICY); POLICY may be
  prefixed "gpt+" to train the nanoGPT with its tied head instead of the Sequential regressor; one
  launch runs its jobs in order, each in OUT_DIR/POLICY:
  MODE straight: 2 epochs, save weights to straight.pt
  MODE first:    1 epoch, checkpoint in first-<DEVICES>/last.ckpt
  MODE resume:   resume CKPT to 2 epochs, save weights to resumed-to-<DEVICES>.pt
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402
from tests.helpers.zoo import GPTModule, token_loader  # noqa: E402

torch.set_num_threads(1)


def run(out: str, devices: int, policy: str, mode: str, ckpt: str | None) -> None:
    L.seed_everything(5)
    gpt, policy = policy.startswith("gpt+"), policy.removeprefix("gpt+")
    # 9 layers, or 4 blocks: 2 or 4 stages
    model = GPTModule() if gpt else SeqRegressor(optimizer="adamw", lr=0.02, depth=5)
    data = token_loader() if gpt else loader(regression_data(48), 8)
    callbacks = [ModelCheckpoint(dirpath=os.path.join(out, f"first-{devices}"), save_last=True, save_top_k=0)]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=AsyncPipeStrategy(policy=policy, microbatches=4),
        max_epochs=1 if mode == "first" else 2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks if mode == "first" else [], enable_checkpointing=mode == "first",
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=os.path.join(out, ckpt) if ckpt else None)
    if trainer.global_rank == 0 and mode != "first":
        name = "straight.pt" if mode == "straight" else f"resumed-to-{devices}.pt"
        torch.save(model.state_dict(), os.path.join(out, name))


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    for job in sys.argv[3:]:
        policy, mode, *ckpt = job.split(":")
        folder = os.path.join(out, policy)
        os.makedirs(folder, exist_ok=True)
        run(folder, devices, policy, mode, ckpt[0] if ckpt else None)


if __name__ == "__main__":
    main()
