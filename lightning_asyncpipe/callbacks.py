"""Lightning callbacks that read the pipeline: the timeline of a real run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_asyncpipe.trace import TimelineRecorder, plot_timeline, write_chrome_trace

__all__ = ["PipelineTimeline"]


class PipelineTimeline(Callback):
    """Record every stage's actions during a few training steps and write them at the end of fit.

    Writes ``<dirpath>/timeline.json`` (Chrome / Perfetto trace) and ``<dirpath>/timeline.png``
    (one row per stage; needs matplotlib) on global rank 0.

    Args:
        dirpath: output folder (created).
        first_step: the first recorded step (skip the fill and warm-up).
        steps: how many consecutive steps to record.
        title: title of the picture (default: the policy's name).
    """

    def __init__(self, dirpath: str | Path = "timeline", first_step: int = 2, steps: int = 4,
                 title: Optional[str] = None) -> None:  # fmt: skip
        self.dirpath, self.first_step, self.steps, self.title = Path(dirpath), first_step, steps, title
        self.json_path: Optional[Path] = None
        self.png_path: Optional[Path] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning_asyncpipe.strategy import AsyncPipeStrategy

        if stage == "fit" and isinstance(trainer.strategy, AsyncPipeStrategy):
            trainer.strategy.timeline = TimelineRecorder(trainer.strategy.stage, self.first_step, self.steps)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning_asyncpipe.strategy import AsyncPipeStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, AsyncPipeStrategy):
            return
        events = strategy.gather_timeline()
        if trainer.is_global_zero and events:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            title = self.title or f"{strategy.policy_name}: {strategy.topology.n_stages} stages, {strategy.microbatches} micro-batches"
            self.json_path = write_chrome_trace(events, self.dirpath / "timeline.json")
            self.png_path = plot_timeline(events, self.dirpath / "timeline.png", title=title)
