"""Unit tests of lightning_asyncpipe.topology: the rank <-> (stage, replica) layout."""

from __future__ import annotations

import pytest

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.topology import Topology


@pytest.mark.parametrize("world_size, n_stages", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 3), (6, 2), (8, 4), (12, 3), (5, 5)])
def test_mapping_is_bijective(world_size, n_stages):
    topo = Topology(world_size, n_stages)
    assert topo.n_replicas == world_size // n_stages
    pairs = [(topo.stage_of(r), topo.replica_of(r)) for r in range(world_size)]
    assert sorted(pairs) == [(s, r) for s in range(n_stages) for r in range(topo.n_replicas)]
    for rank in range(world_size):
        assert topo.rank_of(topo.stage_of(rank), topo.replica_of(rank)) == rank
    for s in range(n_stages):
        for r in range(topo.n_replicas):
            rank = topo.rank_of(s, r)
            assert 0 <= rank < world_size
            assert (topo.stage_of(rank), topo.replica_of(rank)) == (s, r)


@pytest.mark.parametrize("world_size, n_stages", [(1, 1), (4, 2), (6, 3), (8, 4)])
def test_rank_zero_is_last_stage_of_replica_zero(world_size, n_stages):
    topo = Topology(world_size, n_stages)
    assert topo.stage_of(0) == n_stages - 1
    assert topo.replica_of(0) == 0
    assert topo.rank_of(n_stages - 1, 0) == 0


def test_documented_layout():
    topo = Topology(4, 2)
    assert [(topo.stage_of(r), topo.replica_of(r)) for r in range(4)] == [(1, 0), (0, 0), (1, 1), (0, 1)]


def test_pipeline_and_stage_ranks():
    topo = Topology(6, 3)
    assert topo.pipeline_ranks(0) == [2, 1, 0]
    assert topo.pipeline_ranks(1) == [5, 4, 3]
    assert topo.stage_ranks(0) == [2, 5]
    assert topo.stage_ranks(2) == [0, 3]
    # every rank appears in exactly one pipeline and one stage group
    assert sorted(r for rep in range(2) for r in topo.pipeline_ranks(rep)) == list(range(6))
    assert sorted(r for s in range(3) for r in topo.stage_ranks(s)) == list(range(6))
    for rep in range(2):
        assert [topo.stage_of(r) for r in topo.pipeline_ranks(rep)] == [0, 1, 2]
        assert {topo.replica_of(r) for r in topo.pipeline_ranks(rep)} == {rep}


def test_single_stage_is_data_parallel():
    topo = Topology(3, 1)
    assert topo.stage_ranks(0) == [0, 1, 2]
    assert [topo.pipeline_ranks(r) for r in range(3)] == [[0], [1], [2]]


@pytest.mark.parametrize("world_size, n_stages", [(3, 2), (4, 3), (1, 2), (10, 4)])
def test_world_not_divisible(world_size, n_stages):
    with pytest.raises(
        PipelineConfigError,
        match=rf"number of processes \({world_size}\) to be divisible by the number of pipeline stages \({n_stages}\)",
    ):
        Topology(world_size, n_stages)


@pytest.mark.parametrize("n_stages", [0, -1])
def test_stages_at_least_one(n_stages):
    with pytest.raises(PipelineConfigError, match=rf"stages >= 1, got stages={n_stages}"):
        Topology(4, n_stages)
