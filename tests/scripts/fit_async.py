"""Asynchronous policies through Lightning's Trainer on 3 stages, with validation every 3 steps and
an epoch boundary (both drain the pipeline), gradient clipping and a StepLR schedule; rank 0
saves the final weights per policy.

Usage: python fit_async.py OUT_DIR POLICY:OPTIM[:option=value,...] ...
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402

torch.set_num_threads(1)


def parse(spec: str) -> tuple[str, str, dict[str, object]]:
    policy, optim, *rest = spec.split(":")
    options = {k: v == "True" for k, v in (kv.split("=") for kv in rest[0].split(","))} if rest else {}
    return policy, optim, options


def main() -> None:
    out = sys.argv[1]
    for spec in sys.argv[2:]:
        policy, optim, options = parse(spec)
        L.seed_everything(11)
        model = SeqRegressor(optimizer=optim, depth=4)
        trainer = L.Trainer(
            accelerator="cpu", devices=3, max_steps=8, val_check_interval=3, gradient_clip_val=0.3,
            strategy=AsyncPipeStrategy(policy=policy, microbatches=3, policy_options=options),
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(model, loader(regression_data(48), 8), loader(regression_data(16, seed=1), 8))
        if trainer.global_rank == 0:
            torch.save(model.state_dict(), os.path.join(out, spec.replace(":", "_").replace(",", "_") + ".pt"))


if __name__ == "__main__":
    main()
