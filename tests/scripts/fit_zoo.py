"""Train a zoo model (tests/helpers/zoo.py) with AsyncPipeStrategy and save, on rank 0, the final
weights and the logged metrics; with DEVICES=0 a plain one-device Trainer (the reference). For
the ResNet the reference accumulates gradients over the 4 micro-batches of each batch
(``accumulate_grad_batches=4`` on batches of 2): BatchNorm normalises each micro-batch by its own
statistics and updates its running statistics once per micro-batch, in the pipeline as there.

Usage: python fit_zoo.py OUT_DIR DEVICES MODEL:POLICY [MODEL:POLICY ...]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import MemoryLogger  # noqa: E402
from tests.helpers.zoo import GPTModule, LSTMModule, ResNetModule, image_loader, sequence_loader, token_loader  # noqa: E402

torch.set_num_threads(1)
MODELS = {"gpt": (GPTModule, token_loader), "resnet": (ResNetModule, image_loader), "lstm": (LSTMModule, sequence_loader)}
MICROBATCHES = 4
# names the tests use for a policy with options
VARIANTS = {"zero_bubble_merged": ("zero_bubble", {"merge_weight_grads": True})}


def fit(out: str, name: str, devices: int, policy: str) -> None:
    module_class, data = MODELS[name]
    L.seed_everything(3)
    model = module_class()
    logger = MemoryLogger()
    loader = data()
    if devices == 0:
        options: dict = {"accumulate_grad_batches": MICROBATCHES} if name == "resnet" else {}
        loader = data(batch_size=8 // MICROBATCHES) if name == "resnet" else loader
    else:  # and a consolidated checkpoint at the end of fit, written from the stages
        base, policy_options = VARIANTS.get(policy, (policy, {}))
        options = {"strategy": AsyncPipeStrategy(policy=base, microbatches=MICROBATCHES, policy_options=policy_options),
                   "callbacks": [ModelCheckpoint(os.path.join(out, f"{name}-{devices}-{policy}"), save_last=True,
                                                 save_top_k=0)]}  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=max(devices, 1), max_steps=6, logger=logger, log_every_n_steps=1,
        gradient_clip_val=0.5, enable_checkpointing=devices > 0, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **options,
    )  # fmt: skip
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        tag = f"{name}-{devices}-{policy}"
        torch.save(model.state_dict(), os.path.join(out, f"{tag}.pt"))
        logger.dump(os.path.join(out, f"{tag}.json"))


def main() -> None:
    out, devices = sys.argv[1], int(sys.argv[2])
    for spec in sys.argv[3:]:
        name, policy = spec.split(":")
        fit(out, name, devices, policy)


if __name__ == "__main__":
    main()
