"""validate / test / predict / fit / save_checkpoint in a given order on one 2-stage Trainer, for
several policies: the multi-process side of tests/test_after_fit.py. Rank 0 records what each call
returned and the weights the module holds after fit; ModelCheckpoint(save_last=True) writes the
checkpoint of the end of fit to compare ``trainer.save_checkpoint`` with.

Usage: python fit_orders.py OUT_DIR ORDER POLICY [POLICY ...]   (ORDER e.g. validate,fit,save,test)
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    out, order, policies = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    train, val = loader(regression_data(48), 8), loader(regression_data(16, seed=1), 8)
    for policy in policies:
        folder = os.path.join(out, policy)
        L.seed_everything(7)
        # SGD: every policy accepts it but nesterov_async, which needs NAdam (or Nesterov SGD)
        model = SeqRegressor(optimizer="nadam" if policy == "nesterov_async" else "sgd", lr=0.05, depth=4)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        last = ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=0)
        trainer = L.Trainer(
            accelerator="cpu", devices=2, max_steps=7, val_check_interval=4, limit_val_batches=2,
            strategy=AsyncPipeStrategy(policy=policy, microbatches=2), callbacks=[last], logger=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder,
        )  # fmt: skip
        calls: list[list] = []
        for i, call in enumerate(order):
            if call == "fit":
                trainer.fit(model, train, val)
                result = None
            elif call == "save":
                trainer.save_checkpoint(os.path.join(folder, f"saved{i}.ckpt"))
                result = f"saved{i}.ckpt"
            elif call == "predict":
                predictions = trainer.predict(model, loader(regression_data(16, seed=2), 4))
                result = None if predictions is None else torch.cat(predictions).tolist()
            else:
                result = getattr(trainer, call)(model, val, verbose=False)
            calls.append([call, result])
        if trainer.global_rank == 0:
            torch.save({"initial": initial, "final": model.state_dict()}, os.path.join(folder, "weights.pt"))
            with open(os.path.join(folder, "calls.json"), "w") as f:
                json.dump(calls, f)


if __name__ == "__main__":
    main()
