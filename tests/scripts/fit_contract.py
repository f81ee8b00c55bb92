"""Small Lightning-contract cases (issue 15), one per launch.

Usage: python fit_contract.py OUT_DIR CASE
  one_device:     devices=1 (one stage) for each synchronous and asynchronous policy, and a plain
                  one-device Trainer; saves each run's weights to OUT_DIR/<name>.pt
  accumulate:     accumulate_grad_batches=3 with gradient clipping, the synchronous policies on 2
                  stages and a plain one-device Trainer; saves OUT_DIR/<name>.pt
  ragged:         loaders whose last batch is smaller than microbatches, synchronous policies and a plain
                  Trainer; saves OUT_DIR/<name>.pt
  ragged_async:   the same with pipedream_2bw (must fail before step 1)
  outputs:        every rank's on_train_batch_end outputs, a plain Trainer, pipedream_flush,
                  pipedream_2bw, and pipedream_2bw with step_outputs="own" on 2 stages
  skip:           training_step returns None for batches 2 and 5 of each epoch: a plain Trainer and
                  pipedream_flush, the same with accumulate_grad_batches=2 (gpipe), pipedream_2bw and
                  pipedream_2bw on the loader without those batches; and the nanoGPT with its tied head,
                  plain and gpipe, accumulate_grad_batches=2 (the skipped batch 5 ends a window: the
                  update goes through the policy, which keeps the head's mirror in step); saves
                  OUT_DIR/<name>.pt
  accumulate_async: pipedream_2bw with accumulate_grad_batches=2 on batches of 8 (2 micro-batches) and
                  without on batches of 16 (4 micro-batches); saves OUT_DIR/window.pt, merged.pt
  eval_outputs:   Lightning 2.x's way to use all of an epoch's step outputs (a list filled in
                  validation_step / test_step after the model call, read with all_gather in the
                  epoch-end hook): a plain Trainer, pipedream_flush and pipedream_2bw on 2 stages, and
                  pipedream_flush with eval_steps_everywhere=False;
                  every rank writes what its hooks saw to OUT_DIR/eval-<name>-rank<r>.json
  two_optimizers: a module whose configure_optimizers returns two optimizers over the first and
                  the last layer, on 2 stages (must fail at setup with the strategy's message)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402
from tests.helpers.models import SeqRegressor, loader, regression_data  # noqa: E402
from tests.helpers.zoo import GPTModule, token_loader  # noqa: E402

torch.set_num_threads(1)


class Outputs(L.Callback):
    """Every rank's on_train_batch_end outputs (the step's loss), to OUT_DIR/outputs-<name>-rank<r>.json."""

    def __init__(self, path: str) -> None:
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        import json

        with open(f"{self.path}-rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.losses, f)


class Skipping(SeqRegressor):
    """Skips batches 2 and 5 of each epoch the Lightning way: training_step returns None first."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx in (2, 5):
            return None
        return super().training_step(batch, batch_idx)


class SkippingGPT(GPTModule):
    """nanoGPT (tied head) skipping batches 2 and 5 of each epoch like :class:`Skipping`."""

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return None if batch_idx in (2, 5) else super().training_step(batch, batch_idx)


class TwoOptimizers(SeqRegressor):
    """A GAN-like split: one optimizer for the first layer, one for the last."""

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[-1].parameters(), lr=0.1)]


class CollectingOutputs(SeqRegressor):
    """Keeps each validation and test step's squared errors in a list (the pattern Lightning 2.0's
    migration guide gives for the removed ``validation_epoch_end``) and reduces them at epoch end."""

    def __init__(self, out: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.out, self.seen = out, []
        self.validation_step_outputs: list[torch.Tensor] = []
        self.test_step_outputs: list[torch.Tensor] = []
        self.returned: list[float] = []  # what validation_step returned, as callbacks get it

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        errors = (self(x) - y).square().mean(1)
        self.validation_step_outputs.append(errors)
        return errors.mean()  # a loss-like value: micro-batches merge by their weighted mean

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        self.returned.append(float(outputs) if outputs is not None else None)

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.test_step_outputs.append((self(x) - y).square().mean(1))

    def _epoch_end(self, kind: str, outputs: list[torch.Tensor]) -> None:
        errors = torch.cat(outputs) if outputs else torch.zeros(0)  # empty: eval_steps_everywhere=False
        gathered = self.all_gather(errors)
        self.seen.append({"kind": kind, "n": errors.numel(), "mse": float(errors.mean()),
                          "gathered": list(gathered.shape), "returned": self.returned})  # fmt: skip
        self.returned = []
        self.log(f"{kind}_mse", errors.mean())
        outputs.clear()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val", self.validation_step_outputs)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test", self.test_step_outputs)
        import json

        with open(f"{self.out}-rank{self.global_rank}.json", "w") as fh:
            json.dump(self.seen, fh)


def fit(model: L.LightningModule, devices: int, strategy: object) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, loader(regression_data(48), 8))


def fit_skipping_gpt(out: str, name: str, policy: str | None) -> None:
    """:class:`SkippingGPT` for 2 epochs with accumulate_grad_batches=2: one device, or 2 stages."""
    L.seed_everything(0)
    model = SkippingGPT()
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if policy is None else 2, max_epochs=2, logger=False,
        strategy="auto" if policy is None else AsyncPipeStrategy(policy=policy, microbatches=2),
        accumulate_grad_batches=2, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, token_loader())
    if trainer.global_rank == 0:
        torch.save({"state": model.state_dict(), "steps": trainer.global_step}, os.path.join(out, f"{name}.pt"))


def main() -> None:
    out, case = sys.argv[1], sys.argv[2]
    if case == "one_device":
        for name in ("plain", "pipedream_flush", "gpipe", "pipedream", "pipedream_2bw", "pipemare"):
            L.seed_everything(0)
            model = SeqRegressor(optimizer="adamw", lr=0.02, depth=3)
            fit(model, 1, "auto" if name == "plain" else AsyncPipeStrategy(policy=name, microbatches=1))
            torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
    elif case == "ragged":  # 50 samples in batches of 8: a last batch of 2 < 4 micro-batches; 10 to validate
        for name in ("plain", "pipedream_flush", "gpipe"):
            L.seed_everything(0)
            model = SeqRegressor(optimizer="adamw", lr=0.02, depth=4)
            trainer = L.Trainer(
                accelerator="cpu", devices=1 if name == "plain" else 2, max_epochs=2, logger=False,
                strategy="auto" if name == "plain" else AsyncPipeStrategy(policy=name, microbatches=4),
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            )  # fmt: skip
            trainer.fit(model, loader(regression_data(50), 8), loader(regression_data(10, seed=1), 8))
            if trainer.global_rank == 0:
                torch.save({"state": model.state_dict(), "steps": trainer.global_step,
                            "val_loss": float(trainer.callback_metrics["val_loss"])}, os.path.join(out, f"{name}.pt"))
    elif case == "ragged_async":  # the same loader with an asynchronous policy: refused before step 1
        L.seed_everything(0)
        model = SeqRegressor(depth=3)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=AsyncPipeStrategy("pipedream_2bw", microbatches=4),
                            max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)  # fmt: skip
        try:
            trainer.fit(model, loader(regression_data(50), 8))
        finally:
            print(f"global_step={trainer.global_step}", flush=True)
    elif case == "accumulate":  # 7 batches, 3 per update: updates after batches 3, 6 and the last
        for name in ("plain", "pipedream_flush", "gpipe"):
            L.seed_everything(0)
            model = SeqRegressor(optimizer="adamw", lr=0.02, depth=4)
            trainer = L.Trainer(
                accelerator="cpu", devices=1 if name == "plain" else 2, accumulate_grad_batches=3, max_epochs=2,
                strategy="auto" if name == "plain" else AsyncPipeStrategy(policy=name, microbatches=2), logger=False,
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                gradient_clip_val=0.5,
            )  # fmt: skip
            trainer.fit(model, loader(regression_data(56), 8))
            if trainer.global_rank == 0:
                torch.save({"state": model.state_dict(), "steps": trainer.global_step}, os.path.join(out, f"{name}.pt"))
    elif case == "outputs":  # what callbacks get as a step's outputs, on every rank
        for name in ("plain", "pipedream_flush", "pipedream_2bw", "pipedream_2bw_own"):
            L.seed_everything(0)
            policy, _, own = name.partition("_own")
            trainer = L.Trainer(
                accelerator="cpu", devices=1 if name == "plain" else 2, max_epochs=1, logger=False,
                strategy="auto" if name == "plain" else AsyncPipeStrategy(
                    policy=policy, microbatches=2, step_outputs="own" if name.endswith("_own") else "latest"),
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                callbacks=[Outputs(os.path.join(out, f"outputs-{name}"))],
            )  # fmt: skip
            trainer.fit(SeqRegressor(optimizer="adamw", lr=0.02, depth=4), loader(regression_data(48), 8))
    elif case == "skip":  # 6 batches per epoch, 2 and 5 (the last) skipped; the async run also without them
        data = regression_data(48)
        kept = torch.utils.data.Subset(data, [i for i in range(48) if i // 8 not in (2, 5)])
        # the one-device runs first: after a launch every process would run them (racing on one file)
        fit_skipping_gpt(out, "gpt_plain_acc", None)
        for name, policy, accumulate in (("plain", None, 1), ("plain_acc", None, 2),
                                         ("pipedream_flush", "pipedream_flush", 1), ("gpipe_acc", "gpipe", 2),
                                         ("pipedream_2bw", "pipedream_2bw", 1), ("pipedream_2bw_kept", "pipedream_2bw", 1)):  # fmt: skip
            L.seed_everything(0)
            asynchronous = policy == "pipedream_2bw"
            model = (SeqRegressor if name.endswith("kept") else Skipping)(
                optimizer="adamw", lr=0.02, depth=4, scheduler=not asynchronous)
            trainer = L.Trainer(
                accelerator="cpu", devices=1 if policy is None else 2, max_epochs=2, logger=False,
                strategy="auto" if policy is None else AsyncPipeStrategy(policy=policy, microbatches=2),
                accumulate_grad_batches=accumulate, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False,
            )  # fmt: skip
            trainer.fit(model, loader(kept if name.endswith("kept") else data, 8))
            if trainer.global_rank == 0:
                torch.save({"state": model.state_dict(), "steps": trainer.global_step}, os.path.join(out, f"{name}.pt"))
        fit_skipping_gpt(out, "gpt_gpipe_acc", "gpipe")
    elif case == "accumulate_async":  # 2BW: windows of 2 batches of 8 (2 micro-batches) vs batches of 16 (4)
        for name, batch, microbatches, accumulate in (("window", 8, 2, 2), ("merged", 16, 4, 1)):
            L.seed_everything(0)
            model = SeqRegressor(optimizer="adamw", lr=0.02, depth=4)
            trainer = L.Trainer(
                accelerator="cpu", devices=2, max_epochs=2, logger=False, accumulate_grad_batches=accumulate,
                strategy=AsyncPipeStrategy(policy="pipedream_2bw", microbatches=microbatches),
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            )  # fmt: skip
            trainer.fit(model, loader(regression_data(64), batch))
            if trainer.global_rank == 0:
                torch.save({"state": model.state_dict(), "steps": trainer.global_step}, os.path.join(out, f"{name}.pt"))
    elif case == "eval_outputs":
        for name in ("plain", "pipedream_flush", "pipedream_2bw", "pipedream_flush_last"):
            L.seed_everything(0)
            model = CollectingOutputs(os.path.join(out, f"eval-{name}"), optimizer="adamw", lr=0.02, depth=4)
            policy = name.removesuffix("_last")
            trainer = L.Trainer(
                accelerator="cpu", devices=1 if name == "plain" else 2, max_epochs=2, logger=False,
                strategy="auto" if name == "plain" else AsyncPipeStrategy(
                    policy=policy, microbatches=2, eval_steps_everywhere=not name.endswith("_last")),
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            )  # fmt: skip
            val = loader(regression_data(20, seed=1), 8)  # batches of 8, 8, 4
            trainer.fit(model, loader(regression_data(48), 8), val)
            trainer.test(model, val)
    elif case == "two_optimizers":
        L.seed_everything(0)
        fit(TwoOptimizers(depth=3), 2, AsyncPipeStrategy(policy="pipedream_flush", microbatches=2))


if __name__ == "__main__":
    main()
