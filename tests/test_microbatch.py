"""Unit tests of lightning_asyncpipe.microbatch: split/merge round trips, weights, errors."""

from __future__ import annotations

import math
from collections import OrderedDict, namedtuple

import pytest
import torch

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.microbatch import batch_size, merge, microbatch_weights, signature, split

Pair = namedtuple("Pair", ["x", "y"])


def _assert_same(a, b):
    """Structural equality with exact tensor comparison and exact container types."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def test_split_tensor_round_trip():
    x = torch.arange(24.0).reshape(8, 3)
    parts = split(x, 4)
    assert len(parts) == 4
    assert all(isinstance(p, torch.Tensor) and p.shape == (2, 3) for p in parts)
    assert torch.equal(parts[1], x[2:4])
    _assert_same(merge(parts), x)


def test_split_tuple_round_trip():
    batch = (torch.arange(6), torch.arange(12.0).reshape(6, 2))
    parts = split(batch, 3)
    assert [type(p) for p in parts] == [tuple] * 3
    assert parts[2][0].tolist() == [4, 5]
    assert parts[2][1].tolist() == [[8.0, 9.0], [10.0, 11.0]]
    _assert_same(merge(parts), batch)


def test_split_list_round_trip():
    batch = [torch.arange(4), torch.ones(4, 5)]
    parts = split(batch, 2)
    assert [type(p) for p in parts] == [list, list]
    assert parts[1][0].tolist() == [2, 3]
    _assert_same(merge(parts), batch)


def test_split_dict_round_trip():
    batch = {"x": torch.randn(6, 2), "y": torch.arange(6)}
    parts = split(batch, 2)
    assert [list(p) for p in parts] == [["x", "y"], ["x", "y"]]
    assert parts[0]["y"].tolist() == [0, 1, 2]
    assert parts[1]["y"].tolist() == [3, 4, 5]
    _assert_same(merge(parts), batch)


def test_split_ordered_dict_keeps_type():
    batch = OrderedDict(a=torch.arange(4), b=torch.arange(4) * 10)
    parts = split(batch, 2)
    assert all(type(p) is OrderedDict for p in parts)
    assert parts[1]["b"].tolist() == [20, 30]


def test_split_nested_round_trip():
    batch = {
        "inputs": (torch.arange(10), [torch.arange(20).reshape(10, 2), {"mask": torch.ones(10, dtype=torch.bool)}]),
        "target": torch.arange(10.0),
    }
    parts = split(batch, 5)
    assert len(parts) == 5
    assert parts[3]["inputs"][0].tolist() == [6, 7]
    assert parts[3]["inputs"][1][0].tolist() == [[12, 13], [14, 15]]
    assert parts[3]["inputs"][1][1]["mask"].tolist() == [True, True]
    assert parts[3]["target"].tolist() == [6.0, 7.0]
    assert type(parts[3]["inputs"]) is tuple and type(parts[3]["inputs"][1]) is list
    _assert_same(merge(parts), batch)


def test_split_namedtuple_round_trip():
    batch = Pair(torch.arange(6), torch.arange(6) + 100)
    parts = split(batch, 3)
    assert all(type(p) is Pair for p in parts)
    assert parts[1].x.tolist() == [2, 3]
    assert parts[1].y.tolist() == [102, 103]
    merged = merge(parts)
    assert type(merged) is Pair
    _assert_same(merged, batch)


def test_non_tensor_leaves_are_passed_to_every_chunk():
    batch = (torch.arange(5), "tag", 7, None, {"name": "abc", "x": torch.arange(5)})
    parts = split(batch, 2)
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    for p in parts:
        assert p[1] == "tag" and p[2] == 7 and p[3] is None and p[4]["name"] == "abc"
    merged = merge(parts)
    assert torch.equal(merged[0], batch[0])
    # other leaves become the list of their per-micro-batch values, None stays None
    assert merged[1] == ["tag", "tag"]
    assert merged[2] == [7, 7]
    assert merged[3] is None
    assert merged[4]["name"] == ["abc", "abc"]
    assert torch.equal(merged[4]["x"], batch[4]["x"])


def test_uneven_chunks():
    x = torch.arange(10)
    parts = split(x, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert torch.equal(merge(parts), x)


def test_single_chunk_and_one_sample_per_chunk():
    x = torch.arange(3)
    assert [p.tolist() for p in split(x, 1)] == [[0, 1, 2]]
    assert [p.tolist() for p in split(x, 3)] == [[0], [1], [2]]


def test_merge_stacks_zero_dim_tensors():
    merged = merge([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)])
    assert merged.shape == (3,)
    assert merged.tolist() == [1.0, 2.0, 3.0]


def test_merge_needs_outputs():
    with pytest.raises(ValueError, match="at least one output"):
        merge([])


def test_microbatch_weights_even():
    weights = microbatch_weights(split(torch.zeros(8, 2), 4))
    assert weights == [0.25, 0.25, 0.25, 0.25]


def test_microbatch_weights_proportional_and_sum_to_one():
    parts = split({"x": torch.zeros(10, 3), "y": torch.zeros(10)}, 4)
    weights = microbatch_weights(parts)
    assert weights == pytest.approx([0.3, 0.3, 0.2, 0.2])
    assert math.isclose(sum(weights), 1.0)
    sizes = [batch_size(p) for p in parts]
    assert sizes == [3, 3, 2, 2]
    for w, n in zip(weights, sizes):
        assert w == pytest.approx(n / 10)


def test_batch_size_and_signature():
    batch = (torch.zeros(4, 2), {"y": torch.zeros(4, dtype=torch.long)}, "meta")
    assert batch_size(batch) == 4
    assert signature(batch) == ((4, 2), (4,))


def test_chunks_below_one():
    with pytest.raises(PipelineConfigError, match=r"microbatches must be >= 1, got 0\."):
        split(torch.zeros(4), 0)
    with pytest.raises(PipelineConfigError, match=r"microbatches must be >= 1, got -2\."):
        split(torch.zeros(4), -2)


def test_batch_without_tensor():
    with pytest.raises(PipelineConfigError, match=r"batch of type dict .*contains no tensor"):
        split({"a": 1, "b": "text"}, 2)
    with pytest.raises(PipelineConfigError, match=r"batch of type str .*contains no tensor"):
        split("hello", 2)


def test_zero_dim_tensor():
    with pytest.raises(PipelineConfigError, match=r"0-d tensor"):
        split(torch.tensor(3.0), 1)
    with pytest.raises(PipelineConfigError, match=r"0-d tensor"):
        split((torch.zeros(4), torch.tensor(1)), 2)


def test_mismatched_first_dims():
    with pytest.raises(PipelineConfigError, match=r"different first dimensions \[3, 5\]"):
        split((torch.zeros(5, 2), torch.zeros(3)), 2)


def test_batch_smaller_than_chunks():
    with pytest.raises(PipelineConfigError, match=r"batch of 3 samples, fewer than microbatches=4") as info:
        split(torch.zeros(3, 2), 4)
    assert "batch size >= 4" in str(info.value)


def test_errors_are_value_errors_too():
    # PipelineConfigError is both an AsyncPipeError and a ValueError
    with pytest.raises(ValueError):
        split(torch.zeros(2), 0)


def test_per_sample_lists_are_split_with_the_rows_of_the_tensors():
    """The default collate turns per-sample strings (file names, ids, texts) into a list of the
    batch's length: each micro-batch gets its own rows' entries, as its tensors do (issue 15:
    every micro-batch used to get all of them)."""
    names = [f"file{i}.png" for i in range(10)]
    batch = {"x": torch.arange(10).reshape(10, 1), "name": names, "ids": tuple(range(10)), "tag": "train"}
    parts = split(batch, 4)
    for part in parts:
        rows = part["x"].flatten().tolist()
        assert part["name"] == [f"file{i}.png" for i in rows]
        assert part["ids"] == tuple(rows) and part["tag"] == "train"
    assert [len(p["name"]) for p in parts] == [3, 3, 2, 2]


def test_lists_of_another_length_go_to_every_micro_batch_unchanged():
    batch = (torch.zeros(6, 2), ["a", "b", "c"])
    assert [p[1] for p in split(batch, 3)] == [["a", "b", "c"]] * 3
