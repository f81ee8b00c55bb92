"""Two or more engine configurations alternated in one launch: a paired comparison (issue 16).

    python benchmarks/paired.py pipedream_flush zero_bubble zero_bubble:merge_weight_grads=true
    python benchmarks/paired.py pipedream_2bw pipedream_2bw --rounds 24    # an A/A check of the noise

Separate launches on this host differ by 10-20 % in speed (its drift), more than the few percent
that separate schedules. Here the two processes (``throughput.py``'s MLP, batch, micro-batches,
one thread each, gloo) build one raw :class:`~lightning_asyncpipe.engine.PipelineEngine` per
configuration (``policy`` or ``policy:option=value,...``), warm each up, then run ``--rounds``
rounds; in each round every configuration runs ``--steps`` steps (the order rotating from round
to round), timed between barriers, the slower stage's time counting. Reported: each configuration's
median step time and, per round, its time against the first configuration's; the median of those
ratios. Asynchronous configurations keep their pipeline filled across rounds (no drain), so a
round times steady-state steps. Writes ``benchmarks/results/paired.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from throughput import (  # noqa: E402
    BATCH, LAYERS, MICROBATCHES, WIDTH, build_model, loss_fn, make_batches, make_optimizer, spawn_collect,
)

STAGES = 2


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """``policy`` or ``policy:key=value,...`` (values: true/false, integers, floats, else strings)."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        for cast in (int, float):
            if isinstance(value, str):
                try:
                    value = cast(value)
                except ValueError:
                    pass
        options[key] = value
    return name, options


def _worker(rank: int, port: int, specs: list[str], rounds: int, steps: int, warmup: int, queue: Any) -> None:
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.engine import PipelineEngine
    from lightning_asyncpipe.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=STAGES)
    groups = PipelineGroups(Topology(STAGES, STAGES), rank)
    batches = make_batches(warmup + steps)
    engines = []
    for spec in specs:
        policy, options = parse(spec)
        engines.append(PipelineEngine(build_model(), STAGES, policy, MICROBATCHES, make_optimizer, loss_fn,
                                      groups=groups, policy_options=options))  # fmt: skip
        for x, y in batches[:warmup]:
            engines[-1].train_step(x, y)
    times = torch.zeros(rounds, len(specs), dtype=torch.float64)
    for r in range(rounds):
        for i in [(r + k) % len(specs) for k in range(len(specs))]:
            dist.barrier()
            t0 = time.perf_counter()
            for x, y in batches[warmup:]:
                engines[i].train_step(x, y)
            times[r, i] = (time.perf_counter() - t0) / steps
    for e in engines:
        e.drain()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slower stage's time
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(times.tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+", help="policy or policy:option=value,...; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    times = spawn_collect(_worker, STAGES, (args.specs, args.rounds, args.steps, args.warmup), 1, 3600)[0]
    lines = [
        f"`python benchmarks/paired.py {' '.join(args.specs)} --rounds {args.rounds} --steps {args.steps}`: MLP "
        f"{LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, {MICROBATCHES} micro-batches, {STAGES} stages x 1 "
        f"thread, gloo; {args.rounds} rounds of {args.steps} steps per configuration in one launch; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {time.perf_counter() - t0:.0f} s.",
        "",
        f"| configuration | step ms (median) | step time / {args.specs[0]}'s, per round | median ratio |",
        "|---|---:|---|---:|",
    ]
    rows = []
    for i, spec in enumerate(args.specs):
        ratios = [t[i] / t[0] for t in times]
        rows.append({"spec": spec, "step_s": [t[i] for t in times], "ratios": ratios})
        lines.append(f"| `{spec}` | {1e3 * statistics.median(t[i] for t in times):.1f} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.3f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "paired.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "results", "paired.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
