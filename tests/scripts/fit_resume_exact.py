"""Exact mid-epoch resume for every policy: the multi-process side of tests/test_resume_exact.py.

Usage: python fit_resume_exact.py OUT_DIR MODE
  MODE full:   for each policy, 14 steps (6 batches an epoch, shuffled) with a checkpoint every 4
               steps (cases ending in _epochs: 3 epochs, a checkpoint at each epoch's end); final
               weights in OUT_DIR/<name>/full.pt
  MODE resume: for each policy, resume OUT_DIR/<name>/resume_from.ckpt (chosen by the test) in
               these fresh processes and run to step 14; final weights in OUT_DIR/<name>/resumed.pt
  Further arguments name the cases to run (default: all); ``NAME=FOLDER`` runs case NAME in
  OUT_DIR/FOLDER (a resume from a doctored checkpoint).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)
DEVICES, MICROBATCHES, MAX_STEPS = 3, 3, 14

CASES = {
    "pipedream_flush": ("pipedream_flush", {}),
    "pipedream": ("pipedream", {}),
    "pipedream_vsync": ("pipedream", {"vertical_sync": True}),
    "pipedream_2bw": ("pipedream_2bw", {}),
    "pipemare": ("pipemare", {"anneal_updates": 20}),
    "pipelined_backprop": ("pipelined_backprop", {}),
    # epoch-based training (max_epochs, no max_steps) with a checkpoint at each epoch's end: Lightning
    # does not count resuming a finished epoch as restarting and skips the loader's state
    "pipedream_2bw_epochs": ("pipedream_2bw", {}),
}
EPOCHS = 3  # the _epochs cases: 3 epochs of 6 batches


def run(out: str, case: str, resume: bool) -> None:
    name, _, folder_name = case.partition("=")  # "pipemare=control": case pipemare in OUT_DIR/control
    policy, options = CASES[name]
    folder = os.path.join(out, folder_name or name)
    L.seed_everything(7)
    model = SeqRegressor(optimizer="sgd", lr=0.08, depth=4)
    epochs = name.endswith("_epochs")
    every = {"every_n_epochs": 1} if epochs else {"every_n_train_steps": 4}
    ckpt = ModelCheckpoint(dirpath=os.path.join(folder, "resumed" if resume else "ckpt"), save_top_k=-1, **every)
    length = {"max_epochs": EPOCHS} if epochs else {"max_steps": MAX_STEPS}
    trainer = L.Trainer(
        accelerator="cpu", devices=DEVICES, **length, callbacks=[ckpt], logger=False,
        strategy=AsyncPipeStrategy(policy=policy, microbatches=MICROBATCHES, policy_options=options),
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    data = loader(regression_data(48), 8, shuffle=True)
    trainer.fit(model, data, ckpt_path=os.path.join(folder, "resume_from.ckpt") if resume else None)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(folder, "resumed.pt" if resume else "full.pt"))


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    for case in sys.argv[3:] or list(CASES):
        run(out, case, resume=mode == "resume")


if __name__ == "__main__":
    main()
