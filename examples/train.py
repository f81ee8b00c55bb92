"""The main job: train a character-level GPT on the standard library's source with a pipeline.

    python examples/train.py                                   # 2 CPU stages, pipedream_2bw
    python examples/train.py strategy=pipemare trainer.devices=4 strategy.microbatches=8
    python examples/train.py -m strategy=gpipe,pipedream_2bw   # one job per policy
    python examples/train.py experiment=quick                  # a one-minute smoke run

Prints, at the end, the final train and validation loss, samples/s over the whole run (and of
the last logging window), and per stage the measured
bubble, the staleness of applied gradients and the stashed-weight memory, plus where the logs,
checkpoint and timeline were written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `examples.chargpt` for the configs' _target_

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightning_asyncpipe import PipelineTimeline  # noqa: E402
from lightning_asyncpipe.config import register_configs  # noqa: E402

log = logging.getLogger("train")
register_configs()


def _callbacks(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.callbacks or {}).values()]


class RunClock(L.Callback):
    """Samples trained and wall time from the start to the end of training (validation and
    checkpoints included): the whole run's throughput, not one logging window's."""

    def __init__(self) -> None:
        self.samples, self.started, self.seconds = 0, 0.0, float("nan")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples, self.started = 0, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self.samples += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started


def summary(trainer: L.Trainer, n_stages: int, out: Path, callbacks: list[Any], clock: RunClock) -> str:
    """The end-of-run report, from the metrics the run logged."""
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tokens = m.get("pipeline/tokens_per_sec", float("nan")) / m.get("pipeline/samples_per_sec", float("nan"))
    run_rate = clock.samples / clock.seconds
    lines = [
        f"final train_loss {m.get('train_loss', float('nan')):.4f}   val_loss {m.get('val_loss', float('nan')):.4f}",
        f"throughput       {run_rate:.1f} samples/s, {run_rate * tokens:.0f} tokens/s over the run "
        f"({clock.samples} samples in {clock.seconds:.1f} s, validation and checkpoints included); "
        f"last window {m.get('pipeline/samples_per_sec', float('nan')):.1f} samples/s",
        "stage  bubble  staleness(mean/max)  weight copies  stashed weights  activations",
    ]
    for s in range(n_stages):
        g = lambda k: m.get(f"pipeline/stage{s}/{k}", float("nan"))  # noqa: E731
        lines.append(
            f"{s:>5}  {g('bubble'):6.3f}  {g('staleness'):9.2f}/{g('max_staleness'):<9.0f}  {g('weight_copies'):13.0f}  "
            f"{g('stashed_bytes') / 2**20:12.2f} MiB  {g('activation_bytes') / 2**20:8.2f} MiB"
        )
    ckpt = next((c.best_model_path or c.last_model_path for c in callbacks if hasattr(c, "best_model_path")), "")
    timeline = next((c for c in callbacks if isinstance(c, PipelineTimeline)), None)
    lines += [
        f"logs:       {trainer.logger.log_dir if trainer.logger else out}",
        f"checkpoint: {ckpt or '-'}",
        f"timeline:   {timeline.png_path if timeline and timeline.png_path else '-'} (+ timeline.json for Perfetto)",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(cfg.trainer.devices))))
    L.seed_everything(cfg.seed)
    out = Path(HydraConfig.get().runtime.output_dir)
    log.info(f"Instantiating strategy <{cfg.strategy._target_}> with policy {cfg.strategy.policy}")
    strategy = instantiate(cfg.strategy)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    clock = RunClock()
    callbacks = [*_callbacks(cfg), clock]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=logger, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=cfg.ckpt_path)
    if trainer.is_global_zero:
        print("\n" + summary(trainer, strategy.topology.n_stages, out, callbacks, clock), flush=True)


if __name__ == "__main__":
    main()
