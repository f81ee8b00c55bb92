"""``self.log`` / ``self.log_dict`` inside a step the pipeline runs per micro-batch: one record per
name for the batch, the micro-batches' values weighted by their share, batch sizes summed."""

from __future__ import annotations

import pytest
import torch

from lightning_asyncpipe.user_step import LogRecorder


def _log(recorder: LogRecorder, shares: list[float], values: list[float], **kwargs) -> list:
    for share, value in zip(shares, values):
        recorder.weight = share
        recorder("loss", torch.tensor(value), **kwargs)
    return recorder.pop()


def test_values_are_weighted_by_share_and_batch_sizes_summed_per_micro_batch() -> None:
    recorder = LogRecorder()
    [record] = _log(recorder, [3 / 8, 3 / 8, 2 / 8], [1.0, 2.0, 4.0], prog_bar=True)
    assert record.name == "loss" and record.kwargs == {"prog_bar": True}  # Lightning infers the batch size
    assert float(record.value) == pytest.approx((3 * 1.0 + 3 * 2.0 + 2 * 4.0) / 8)
    # explicit sizes of uneven micro-batches: their sum, not the first one's times their count
    recorder.weight = 3 / 8
    recorder("loss", torch.tensor(1.0), batch_size=3)
    recorder("loss", torch.tensor(1.0), batch_size=3)
    recorder.weight = 2 / 8
    recorder("loss", torch.tensor(1.0), batch_size=2)
    [record] = recorder.pop()
    assert record.kwargs == {"batch_size": 8}


def test_log_dict_passes_batch_size_none() -> None:
    """``LightningModule.log_dict`` calls ``self.log(..., batch_size=None)`` when none is given: left
    for Lightning to infer (before: "int() argument must be ... not 'NoneType'")."""
    recorder = LogRecorder()
    [record] = _log(recorder, [0.5, 0.5], [1.0, 3.0], batch_size=None, sync_dist=False)
    assert float(record.value) == pytest.approx(2.0)
    assert record.kwargs == {"batch_size": None, "sync_dist": False}
