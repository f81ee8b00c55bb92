"""Going past one machine uses Lightning's cluster environments (issue 6, point 5): two launches
with num_nodes=2 on 127.0.0.1 (NODE_RANK 0 and 1), and a torchrun launch, give the weights of one
single-node launch of the same world size."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import SCRIPTS, run_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("multinode")
    result = run_script("fit_multinode.py", out, "single", timeout=180)
    assert result.returncode == 0, result.output[-5000:]
    return out


def _assert_same_weights(a: dict, b: dict) -> None:
    for name in a:  # the same layout and arithmetic on one node or two: bitwise
        assert torch.equal(b[name], a[name]), name


@pytest.mark.multiprocess
def test_two_nodes_on_one_machine_equal_one_node(single) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    # the second "machine" runs in a background thread while this one runs in the foreground
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        node1 = pool.submit(run_script, "fit_multinode.py", single, "node", timeout=180, env={**env, "NODE_RANK": "1"})
        node0 = run_script("fit_multinode.py", single, "node", timeout=180, env={**env, "NODE_RANK": "0"})
        node1_result = node1.result()
    assert node0.returncode == 0, node0.output[-5000:]
    assert node1_result.returncode == 0, node1_result.output[-5000:]
    assert "rank 0 of 4: stage 3 on node 0" in node0.output
    assert "rank 2 of 4: stage 1 on node 1" in node1_result.output  # the pipeline crosses the node boundary
    _assert_same_weights(torch.load(single / "single.pt"), torch.load(single / "node.pt"))


@pytest.mark.multiprocess
def test_torchrun_launch_equals_lightning_launch(single) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", str(SCRIPTS / "fit_multinode.py")]  # fmt: skip
    result = run_script(torchrun[-1], single, "torchrun", timeout=180, launcher=torchrun[:-1])
    assert result.returncode == 0, result.output[-5000:]
    _assert_same_weights(torch.load(single / "single.pt"), torch.load(single / "torchrun.pt"))
