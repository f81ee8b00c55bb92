"""Train a zoo model (tests/helpers/zoo.py) with AsyncPipeStrategy and save, on rank 0, the final
weights and the logged metrics; with DEVICES=0 a plain one-device Trainer (the reference).

Usage: python fit_zoo.py OUT_DIR MODEL DEVICES POLICY [POLICY ...]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import MemoryLogger  # noqa: E402
from tests.helpers.zoo import GPTModule, token_loader  # noqa: E402

torch.set_num_threads(1)
MODELS = {"gpt": (GPTModule, token_loader)}


def fit(out: str, name: str, devices: int, policy: str) -> None:
    module_class, data = MODELS[name]
    L.seed_everything(3)
    model = module_class()
    logger = MemoryLogger()
    strategy = {} if devices == 0 else {"strategy": AsyncPipeStrategy(policy=policy, microbatches=4)}
    trainer = L.Trainer(
        accelerator="cpu", devices=max(devices, 1), max_steps=6, logger=logger, log_every_n_steps=1,
        gradient_clip_val=0.5, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **strategy,
    )  # fmt: skip
    trainer.fit(model, data())
    if trainer.global_rank == 0:
        tag = f"{name}-{devices}-{policy}"
        torch.save(model.state_dict(), os.path.join(out, f"{tag}.pt"))
        logger.dump(os.path.join(out, f"{tag}.json"))


def main() -> None:
    out, name, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for policy in sys.argv[4:]:
        fit(out, name, devices, policy)


if __name__ == "__main__":
    main()
