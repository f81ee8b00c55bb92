"""Where a stage's step goes beyond the kernel floor (issue 16, point 3).

    python benchmarks/gap.py                          # pipedream_2bw, 3 rounds (about 1 min)
    python benchmarks/gap.py --policy pipedream --rounds 5

``throughput.py`` compares whole-pipeline rates; this probe takes one stage's step apart. Each of the
two processes (one thread each, throughput.py's MLP, batch and micro-batches) measures, in one
launch and in this order, each block between barriers so that both stages run it at once:

1. ``floor``: the stage's bare kernels (``floor.py``'s :class:`StageKernels`, 1F1B order);
2. ``ceiling``: the raw engine with the transfers taken out (``throughput.py``'s replay transport),
   and the same under ``torch.profiler``, its self CPU time sorted into GEMMs (``mm``, ``addmm``),
   other kernels (ReLU and its mask, the loss, the optimizer's ``_foreach`` kernels, sums), copies
   and allocations (``copy_``, ``cat``, ``clone``, ``empty``, ``zeros`` ...), autograd's own nodes
   (time an autograd node spends outside the kernels it calls) and the rest (Python: the engine,
   the policy, the profiler's own cost);
3. ``engine``: the raw engine with gloo transfers, every action timed by the executor: the
   compute of forwards, backwards, weight gradients and updates, the time spent waiting for a
   neighbour's tensor, and what falls between actions (receives posted, the step's bookkeeping).

The table gives each block in ms per step (medians over the rounds), so ``ceiling - floor`` is the
engine's own cost and ``engine - ceiling`` the cost of coupling the stages. Writes
``benchmarks/results/gap_<policy>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from floor import StageKernels, _stage_bounds  # noqa: E402
from throughput import (  # noqa: E402
    BATCH, LAYERS, MICROBATCHES, WIDTH, build_model, loss_fn, make_batches, make_optimizer, pin_to_core,
    replay_transfers, spawn_collect,
)

STAGES = 2
GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
COPY = {"aten::copy_", "aten::cat", "aten::clone", "aten::empty", "aten::empty_like", "aten::zeros",
        "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::empty_strided", "aten::contiguous",
        "aten::new_empty", "aten::new_zeros", "aten::resize_", "aten::to", "aten::_to_copy", "aten::detach",
        "aten::view", "aten::t", "aten::transpose", "aten::as_strided", "aten::slice", "aten::split",
        "aten::narrow", "aten::reshape", "aten::expand", "aten::alias", "aten::unsafe_split"}  # fmt: skip


def _category(name: str) -> str:
    if name in GEMM:
        return "gemm"
    if name in COPY:
        return "copies"
    if name.startswith("autograd::") or name.endswith("Backward0") or name.endswith("Backward1") \
            or name.startswith("torch::autograd"):  # fmt: skip
        return "autograd"
    if name.startswith("aten::") or name.startswith("c10d::") or name.startswith("gloo:"):
        return "kernels"
    return "other"


def _timed_steps(step: Any, steps: int, finish: Any = None) -> float:
    """Seconds per step on this stage alone (throughput.py's ``_timed`` includes the wait for the
    slowest rank at the closing barrier)."""
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if finish is not None:
        finish()
    elapsed = time.perf_counter() - t0
    dist.barrier()
    return elapsed / steps


def _engine(policy: str, groups: Any) -> Any:
    from lightning_asyncpipe.engine import PipelineEngine

    return PipelineEngine(build_model(), STAGES, policy, MICROBATCHES, make_optimizer, loss_fn, groups=groups)


def _worker(rank: int, port: int, policy: str, warmup: int, steps: int, rounds: int, queue: Any) -> None:
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.schedule import ActionKind
    from lightning_asyncpipe.topology import Topology

    pin_to_core(rank)  # with --pin only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=STAGES)
    groups = PipelineGroups(Topology(STAGES, STAGES), rank)
    batches = make_batches(warmup + steps)
    out: dict[str, list[float]] = defaultdict(list)
    stage = Topology(STAGES, STAGES).stage_of(rank)  # rank 0 is the last stage (it logs the loss)
    first, last = _stage_bounds(stage, STAGES)
    for _ in range(rounds):
        # 1. the floor: this stage's bare kernels
        kernels = StageKernels(first, last, MICROBATCHES, seed=stage)
        for _ in range(warmup):
            kernels.step(stage, STAGES)
        out["floor"].append(_timed_steps(lambda i: kernels.step(stage, STAGES), steps))
        del kernels

        # 2. the ceiling: the engine without transfers, then the same under the profiler
        engine = _engine(policy, groups)
        replay_transfers(engine, batches[:warmup])
        out["ceiling"].append(_timed_steps(lambda i: engine.train_step(*batches[warmup + i]), steps, engine.drain))
        from torch.profiler import ProfilerActivity, profile

        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for i in range(steps):
                engine.train_step(*batches[warmup + i])
            engine.drain()
            profiled = (time.perf_counter() - t0) / steps
        dist.barrier()
        by: dict[str, float] = defaultdict(float)
        for e in prof.key_averages():
            by[_category(e.key)] += e.self_cpu_time_total / 1e6 / steps
        accounted = sum(by.values())
        ops = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        out.setdefault("top_ops", []).append([  # type: ignore[arg-type]
            f"{e.key} {e.input_shapes} x{e.count // steps}: {e.self_cpu_time_total / 1e3 / steps:.2f} ms" for e in ops[:12]])
        out["profiled"].append(profiled)
        for cat in ("gemm", "kernels", "copies", "autograd", "other"):
            out[f"ceiling/{cat}"].append(by[cat] * out["ceiling"][-1] / profiled)  # scaled to the unprofiled step
        out["ceiling/python"].append(max(profiled - accounted, 0.0) * out["ceiling"][-1] / profiled)
        engine.executor.close()
        del engine, prof

        # 3. the engine with transfers, every action timed
        engine = _engine(policy, groups)
        for i in range(warmup):
            engine.train_step(*batches[i])
        timings: list[Any] = []

        def timed_step(i: int) -> None:
            engine.train_step(*batches[warmup + i])
            timings.extend(engine.last_timings)  # the engine keeps only the last step's

        out["engine"].append(_timed_steps(timed_step, steps, engine.drain))
        timings.extend(engine.executor.pop_timings())  # the drain's
        per: dict[str, float] = defaultdict(float)
        for t in timings:
            kind = {ActionKind.FORWARD: "F", ActionKind.BACKWARD: "B", ActionKind.WEIGHT: "W"}.get(t.action.kind, "U")
            per[kind] += (t.end - t.start - t.wait) / steps
            per["wait"] += t.wait / steps
        for key in ("F", "B", "W", "U", "wait"):
            out[f"engine/{key}"].append(per[key])
        out["engine/between"].append(out["engine"][-1] - sum(per.values()))
        engine.executor.close()
        del engine
    dist.barrier()
    dist.destroy_process_group()
    queue.put((stage, dict(out)))


ROWS = [
    ("floor", "floor: the stage's bare kernels"),
    ("ceiling", "ceiling: the engine, no transfers"),
    ("ceiling/gemm", "  GEMMs (mm, addmm)"),
    ("ceiling/kernels", "  other kernels (ReLU, mask, loss, optimizer, sums)"),
    ("ceiling/copies", "  copies, allocations, views"),
    ("ceiling/autograd", "  autograd nodes, outside their kernels"),
    ("ceiling/other", "  other profiled ranges"),
    ("ceiling/python", "  not in any op: Python, the engine, the policy"),
    ("engine", "engine: with gloo transfers"),
    ("engine/F", "  forward compute"),
    ("engine/B", "  backward compute"),
    ("engine/W", "  weight-gradient actions"),
    ("engine/U", "  updates (deferred weight gradients, optimizer, policy)"),
    ("engine/wait", "  waiting for a neighbour's tensor"),
    ("engine/between", "  between actions"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="pipedream_2bw")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pin", action="store_true", help="each process on its own core (throughput.py's --pin)")
    args = ap.parse_args()
    if args.pin:
        os.environ["ASYNCPIPE_BENCH_PIN"] = "1"
    results = dict(spawn_collect(_worker, STAGES, (args.policy, args.warmup, args.steps, args.rounds), STAGES,
                                 1200))  # by stage  # fmt: skip
    top = {r: results[r].pop("top_ops") for r in results}
    med = {r: {k: statistics.median(v) * 1e3 for k, v in results[r].items()} for r in results}
    lines = [
        f"Where a step goes, `{args.policy}`: MLP ({LAYERS} x Linear({WIDTH}, {WIDTH})), batch {BATCH}, "
        f"{MICROBATCHES} micro-batches, {STAGES} stages x 1 thread; {args.warmup} warm-up + {args.steps} timed "
        f"steps, medians of {args.rounds} rounds; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        "| ms per step | " + " | ".join(f"stage {r}" for r in sorted(med)) + " |",
        "|---|" + "---:|" * len(med),
    ]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{med[r][key]:.1f}" for r in sorted(med)) + " |")
    slow = max(med, key=lambda r: med[r]["engine"])
    lines += [
        "",
        f"Samples/s (the slower stage): floor {BATCH / max(m['floor'] for m in med.values()) * 1e3:.0f}, "
        f"ceiling {BATCH / max(m['ceiling'] for m in med.values()) * 1e3:.0f}, "
        f"engine {BATCH / med[slow]['engine'] * 1e3:.0f}.",
    ]
    for r in sorted(top):
        lines += ["", f"Stage {r}, the ceiling's largest ops (self CPU per step, last round, under the profiler):", ""]
        lines += [f"- `{op}`" for op in top[r][-1]]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"gap_{args.policy}" + ("_pinned" if args.pin else ""))
    with open(path + ".md", "w") as f:
        f.write(text)
    with open(path + ".json", "w") as f:
        json.dump({"args": vars(args), "ms_per_step_median": med, "per_round_s": results, "top_ops": top}, f, indent=1)


if __name__ == "__main__":
    main()
