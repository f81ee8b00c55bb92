"""Lightning against the raw engine, interleaved inside the same processes (issue 16).

    python benchmarks/lightning_vs_raw.py                      # all six policies, 6 rounds
    python benchmarks/lightning_vs_raw.py --policies pipedream_2bw --rounds 10 --block 8

``throughput.py`` and ``overhead.py`` compare separate launches: minutes apart, different
processes, and this host's speed drifts by 10-20 % over such spans, more than the few percent to
resolve. Here one Lightning ``fit`` (2 stages, :class:`~lightning_asyncpipe.AsyncPipeStrategy`, the
MLP, batch and micro-batches of ``throughput.py``) alternates, in the same two processes, a block
of ``--block`` Lightning steps with a block of as many steps of a raw
:class:`~lightning_asyncpipe.engine.PipelineEngine` on its own copy of the model (its own process
groups; run from a callback at the start of a Lightning step, when no transfer of Lightning's
pipeline is pending). Each block's steps are timed one by one on each stage (a Lightning step: from
one ``on_train_batch_start`` to the next; a raw step: ``train_step``); a round is one block of each,
the first round is warm-up; even rounds run the raw block first, odd rounds the Lightning block.
Per round the ratio is raw step time / Lightning step time of the slower stage (the samples/s ratio
Lightning / raw); the median over rounds is reported with a distribution-free 95 % interval, so a
drift of the host falls on both sides of every ratio alike.

Writes ``benchmarks/results/lightning_vs_raw.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from throughput import (  # noqa: E402
    BATCH, LAYERS, MICROBATCHES, POLICIES, WIDTH, batch_loader, build_model, lightning_module, loss_fn, make_batches,
    make_optimizer,
)

RESULTS = os.path.join(HERE, "results")


def worker(policy: str, block: int, rounds: int, out: str) -> None:
    """One Lightning fit (re-run by Lightning's launcher for the second stage) with raw blocks inside."""
    import lightning as L
    import torch.distributed as dist

    from lightning_asyncpipe import AsyncPipeStrategy
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.engine import PipelineEngine
    from lightning_asyncpipe.topology import Topology

    torch.set_num_threads(1)
    n_steps = block * (rounds + 1)  # one warm-up round
    batches = make_batches(n_steps)

    class Interleave(L.Callback):
        def __init__(self) -> None:
            self.engine: Any = None
            self.last = 0.0
            self.lightning: list[list[float]] = [[] for _ in range(rounds + 1)]
            self.raw: list[list[float]] = [[] for _ in range(rounds + 1)]
            self.raw_step = 0

        def _raw_block(self, r: int) -> None:
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(block):
                    x, y = batches[self.raw_step % n_steps]
                    self.raw_step += 1
                    start = time.perf_counter()
                    self.engine.train_step(x, y)
                    self.raw[r].append(time.perf_counter() - start)

        def on_train_start(self, trainer: Any, module: Any) -> None:
            world, rank = dist.get_world_size(), dist.get_rank()
            self.engine = PipelineEngine(build_model(), world, policy, MICROBATCHES, make_optimizer, loss_fn,
                                         groups=PipelineGroups(Topology(world, world), rank))  # fmt: skip
            self.stage = self.engine.stage

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            if batch_idx > 0:
                self.lightning[(batch_idx - 1) // block].append(now - self.last)
            if batch_idx % block == 0:
                r = batch_idx // block
                if r % 2 == 0 and r > 0:  # odd rounds run their raw block after their Lightning block
                    self._raw_block(r - 1)
                if r % 2 == 0:  # even rounds before
                    self._raw_block(r)
                now = time.perf_counter()
            self.last = now

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == n_steps:  # the last step has no next start
                self.lightning[-1].append(time.perf_counter() - self.last)

        def on_train_end(self, trainer: Any, module: Any) -> None:
            if rounds % 2 == 1:  # the last round (index rounds) is odd: its raw block comes last
                self._raw_block(rounds)
            self.engine.drain()
            with open(f"{out}.stage{self.stage}.json", "w") as f:
                json.dump({"stage": self.stage, "lightning": self.lightning[1:], "raw": self.raw[1:]}, f)

    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=n_steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[Interleave()],
        strategy=AsyncPipeStrategy(policy=policy, microbatches=MICROBATCHES, pipeline_metrics=False),
    )  # fmt: skip
    trainer.fit(lightning_module(), batch_loader(batches))


def run(policy: str, block: int, rounds: int) -> dict[str, Any]:
    prefix = os.path.join(RESULTS, f".lightning_vs_raw-{policy}")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", policy, "--block", str(block),
                    "--rounds", str(rounds), "--prefix", prefix], env=env, check=True, timeout=900,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    stages = []
    for s in range(2):
        with open(f"{prefix}.stage{s}.json") as f:
            stages.append(json.load(f))
        os.remove(f"{prefix}.stage{s}.json")
    lightning = [max(statistics.median(st["lightning"][r]) for st in stages) for r in range(rounds)]
    raw = [max(statistics.median(st["raw"][r]) for st in stages) for r in range(rounds)]
    ratios = [rw / lt for rw, lt in zip(raw, lightning)]
    return {"policy": policy, "lightning_ms": [1e3 * v for v in lightning], "raw_ms": [1e3 * v for v in raw],
            "ratios": ratios, "median_ratio": statistics.median(ratios), "median_ci95": median_ci(ratios)}  # fmt: skip


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics ``j`` and ``n+1-j``
    with ``j`` the largest rank whose binomial(n, 1/2) tail keeps the coverage >= ``level``."""
    s, n = sorted(values), len(values)
    j, tail = 0, 0.0
    while j < n // 2 and 2 * (tail + math.comb(n, j) / 2**n) <= 1 - level:
        tail += math.comb(n, j) / 2**n
        j += 1
    return (s[0], s[-1]) if j == 0 else (s[j - 1], s[n - j])


def verdict(row: dict[str, Any]) -> str:
    """Whether the >= 0.97 target holds: for the whole 95 % interval, for the median only, or not."""
    if row["median_ci95"][0] >= 0.97:
        return "yes"
    return "median only" if row["median_ratio"] >= 0.97 else "no"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--block", type=int, default=8, help="steps per block (each side, each round)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (one warm-up round more)")
    p.add_argument("--worker", default=None)
    p.add_argument("--prefix", default=None)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.block, a.rounds, a.prefix)
        return
    os.makedirs(RESULTS, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for policy in a.policies.split(","):
        rows.append(run(policy, a.block, a.rounds))
        print(f"{policy}: median {rows[-1]['median_ratio']:.3f}", flush=True)
    lines = [
        f"`python benchmarks/lightning_vs_raw.py --block {a.block} --rounds {a.rounds}`: MLP {LAYERS} x "
        f"Linear({WIDTH}, {WIDTH}), batch {BATCH}, {MICROBATCHES} micro-batches, 2 stages x 1 thread; per round "
        f"{a.block} Lightning steps and {a.block} raw-engine steps in the same processes, the raw block first in "
        f"even rounds and last in odd ones (one warm-up round first); step times are per-block medians of the slower stage. {platform.machine()}, {os.cpu_count()} "
        f"CPUs, torch {torch.__version__}; {time.perf_counter() - t0:.0f} s.",
        "",
        "| policy | Lightning step, ms (median of rounds) | raw step, ms | Lightning / raw per round | median "
        "| 95 % interval of the median | >= 0.97 |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['policy']} | {statistics.median(r['lightning_ms']):.1f} | "
                     f"{statistics.median(r['raw_ms']):.1f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['median_ratio']:.3f} | "
                     f"{r['median_ci95'][0]:.3f}-{r['median_ci95'][1]:.3f} | "
                     f"{verdict(r)} |")  # fmt: skip
    with open(os.path.join(RESULTS, "lightning_vs_raw.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(RESULTS, "lightning_vs_raw.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
