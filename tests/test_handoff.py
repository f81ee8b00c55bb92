"""The hand-off of the last stage's step payloads: serialization and the two-message protocol."""

from __future__ import annotations

import socket

import pytest
import torch

from lightning_asyncpipe.handoff import _INLINE, dumps, loads
from tests.helpers.launch import run_script


def test_dumps_round_trip_keeps_values_dtypes_and_nesting() -> None:
    leaf = torch.randn(3, 4, requires_grad=True)
    payload = {
        "loss": leaf.sum(),  # not a leaf: stored as its value
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        "ints": torch.tensor([1, 2, 3]),
        "flag": torch.tensor(True),
        "bf16": torch.ones(2, dtype=torch.bfloat16),  # no numpy dtype: torch pickles it
        "nested": [("name", torch.tensor(2.5), {"prog_bar": True})],
        "plain": 3.0,
    }
    back = loads(dumps(payload))
    assert back.keys() == payload.keys()
    for key in ("view", "ints", "flag", "bf16"):
        assert back[key].dtype == payload[key].dtype and torch.equal(back[key], payload[key]), key
    assert back["loss"].dtype == torch.float32 and torch.equal(back["loss"], payload["loss"].detach())
    assert not back["loss"].requires_grad
    assert back["nested"][0][0] == "name" and torch.equal(back["nested"][0][1], torch.tensor(2.5))
    assert back["plain"] == 3.0
    back["view"].add_(1)  # received tensors are ordinary writable tensors


def test_small_payload_fits_one_inline_message() -> None:
    assert len(dumps(({"loss": torch.tensor(1.0)}, [("train_loss", torch.tensor(1.0), {})]))) < _INLINE // 4


@pytest.mark.timeout(120)
def test_exchange_delivers_every_payload_in_order_small_and_large() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_script("handoff_exchange.py", port, timeout=100)
    assert result.returncode == 0, result.output[-3000:]
    assert "OK 6" in result.output
