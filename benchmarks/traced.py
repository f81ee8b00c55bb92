"""The cost of running a stage as a program cut from a captured graph, against running its layers
eagerly (what a stage of an ``nn.Sequential`` did before: ``for layer in layers: x = layer(x)``).

    python benchmarks/traced.py                 # the main job's character GPT, stage 0 of 2
    python benchmarks/traced.py --rounds 9 --reps 30

Both sides run the same layer objects on the same micro-batch, forward then backward, in one
process with one thread, alternating in rounds; the median over rounds of the per-iteration time
is reported, and the two results are checked to be bitwise equal. A second pair compares the main
job's GPT as written (nanoGPT-style: a ``ModuleList`` of blocks, embeddings and a tied head as
attributes, a loop in forward) with the same layers as a Sequential
(``benchmarks/gpt_sequential.py``), both captured and split at the same block.
Writes ``benchmarks/results/traced.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from examples.chargpt import CharGPT  # noqa: E402
from benchmarks.gpt_sequential import sequential_gpt  # noqa: E402
from lightning_asyncpipe.partition import plan_partition  # noqa: E402
from lightning_asyncpipe.split import stage_module  # noqa: E402


def _program_step(root: nn.Module, x: torch.Tensor, n_stages: int, points: list[str]) -> Callable[[], torch.Tensor]:
    holder = nn.Module()
    holder.net = root
    plan = plan_partition(holder, n_stages, split_points=points, example=((x,), {}))
    program = plan.split.programs[0]
    stage = stage_module(root, program.attributes)

    def step() -> torch.Tensor:
        out = program(stage, x)
        out.float().pow(2).mean().backward()
        return out

    return step


def _eager_step(layers: list[nn.Module], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        h = x
        for layer in layers:
            h = layer(h)
        h.float().pow(2).mean().backward()
        return h

    return step


def _time(step: Callable[[], torch.Tensor], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="rows of the micro-batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gpt = CharGPT(n_layer=4, n_embd=128, block_size=64).model  # the main job's model, nanoGPT-style
    seq = sequential_gpt(gpt)  # the same layers as a Sequential
    x = torch.randint(0, 256, (args.batch, 64))
    pairs = {
        "stage 0 of 2 (embedding + 2 blocks): eager loop vs program": (
            _eager_step(list(seq)[:3], x), _program_step(seq, x, 2, ["3"])),
        "stage 0 of 2: Sequential GPT vs ModuleList GPT, both programs": (
            _program_step(seq, x, 2, ["3"]), _program_step(gpt, x, 2, ["transformer.h.2"])),
    }  # fmt: skip
    rows = []
    for name, (a, b) in pairs.items():
        assert torch.equal(a().detach(), b().detach()), name  # the same arithmetic
        times: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(args.rounds):
            for key, step in (("a", a), ("b", b)):
                _time(step, 2)  # warm
                times[key].append(_time(step, args.reps))
        ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
        rows.append({"comparison": name, "a_ms": 1e3 * ma, "b_ms": 1e3 * mb, "b_over_a": mb / ma,
                     "a_range_ms": [1e3 * min(times["a"]), 1e3 * max(times["a"])],
                     "b_range_ms": [1e3 * min(times["b"]), 1e3 * max(times["b"])]})  # fmt: skip
        print(f"{name}: {1e3 * ma:.2f} ms vs {1e3 * mb:.2f} ms  (x{mb / ma:.3f})", flush=True)
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "rounds": args.rounds,
            "reps": args.reps, "batch": args.batch}  # fmt: skip
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "traced.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "traced.md"), "w") as f:
        f.write(f"forward + backward of one micro-batch ({args.batch} x 64 tokens), 1 thread, median of {args.rounds} "
                f"rounds x {args.reps}; torch {torch.__version__}\n\n| comparison | a (ms) | b (ms) | b / a |\n|---|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['comparison']} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['b_over_a']:.3f} |\n")


if __name__ == "__main__":
    main()
