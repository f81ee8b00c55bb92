"""A 2-stage pipedream_2bw run stopped by a signal, and the resume from its checkpoint: the
multi-process side of tests/test_signals.py.

Usage: python fit_signal.py train OUT_DIR TOKEN [ACCUMULATE]
         trains "forever" with a ModelCheckpoint in OUT_DIR/ckpt; after step 5 every rank writes
         OUT_DIR/rank<R>.pid (pid and stage); the test then signals one process. TOKEN: a marker,
         so the test can look for processes left behind. ACCUMULATE (default 1):
         accumulate_grad_batches, i.e. asynchronous windows of that many batches (a signal inside
         one stops at its end); kept in OUT_DIR/accumulate for the resume.
       python fit_signal.py resume OUT_DIR CASE [CASE ...]
         for each CASE folder (holding ckpt/interrupted.ckpt written at step S): resume it to step
         S + 3, and run afresh to S + 3 with a checkpoint at step S (a checkpoint drains the
         pipeline, so the drain is part of both runs); weights in CASE/resumed.pt, CASE/straight.pt.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


class ReportPid(L.Callback):
    """Writes the pid files once step 5 is done. With windows, then waits 2 s at that window's end,
    so the test's signal lands there: every rank learns of it a step late, at the start of the next
    window's second batch, with that window's first batch held back (not run yet), and must finish
    the window before it stops."""

    def __init__(self, out: str, accumulate: int) -> None:
        self.out, self.accumulate, self.written = out, accumulate, False

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 5 and not self.written:
            with open(os.path.join(self.out, f"rank{trainer.global_rank}.pid"), "w") as f:
                json.dump({"pid": os.getpid(), "stage": trainer.strategy.stage}, f)  # type: ignore[attr-defined]
            self.written = True
            if self.accumulate > 1:
                time.sleep(2.0)


def fit(folder: str, max_steps: int, callbacks: list, ckpt_path: str | None = None, accumulate: int = 1) -> L.Trainer:
    L.seed_everything(0)
    model = SeqRegressor(optimizer="adamw", lr=0.01)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps, logger=False, callbacks=callbacks,
        strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=2), enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(model, loader(regression_data(96), 8, shuffle=True), ckpt_path=ckpt_path)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), os.path.join(folder, f"{'resumed' if ckpt_path else 'straight'}.pt"))
    return trainer


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "train":
        accumulate = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        with open(os.path.join(out, "accumulate"), "w") as f:
            f.write(str(accumulate))
        checkpoint = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_top_k=0)
        fit(out, 1_000_000, [ReportPid(out, accumulate), checkpoint], accumulate=accumulate)
        return
    for case in sys.argv[3:]:
        folder = os.path.join(out, case)
        interrupted = os.path.join(folder, "ckpt", "interrupted.ckpt")
        stopped_at = torch.load(interrupted, weights_only=False)["global_step"]
        with open(os.path.join(folder, "accumulate")) as f:
            accumulate = int(f.read())
        fit(folder, stopped_at + 3, [], ckpt_path=interrupted, accumulate=accumulate)
        every = ModelCheckpoint(dirpath=os.path.join(folder, "straight"), every_n_train_steps=stopped_at, save_top_k=-1)
        fit(folder, stopped_at + 3, [every], accumulate=accumulate)


if __name__ == "__main__":
    main()
