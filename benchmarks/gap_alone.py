"""The engine's own cost over the bare kernels, in one process with the other core idle (issue 16).

    python benchmarks/gap_alone.py                        # pipedream_2bw, a 4-layer stage, 8 rounds
    python benchmarks/gap_alone.py --policy gpipe --layers 8
    python benchmarks/gap_alone.py --compiled             # also the plain loop, eager and torch.compile'd

``gap.py`` measures both stages of a pipeline at once, where the host's noise and the two processes'
contention blur a few percent. Here one process (one thread) alternates, round by round, the bare
kernels of ``floor.py`` (:class:`StageKernels`: preallocated buffers, in-place ReLU, the loss
gradient written directly, ``dW`` once per batch, ``_foreach`` SGD) and the raw engine with one
stage, on the same work: an MLP of ``--layers`` x Linear(1024, 1024) (4: one stage of
``throughput.py``'s 2-stage split), batch 256 in 8 micro-batches, MSE, SGD with momentum. No
transfers, so engine / floor is the cost of running the user's ``nn.Module`` through the engine:
autograd, the policy, the deferred weight gradients, Python. Then both run once more under
``torch.profiler`` and the ops are listed by how much more self time the engine spends in them.
With ``--compiled`` two more contenders alternate in the same rounds: the plain PyTorch loop on
the same module (forward and backward per micro-batch, gradients accumulated, ``torch.optim.SGD``)
eager, and the same loop with the module ``torch.compile``'d (``--compile-mode``): whether a
compiled stage program is a road from the engine towards the floor on this CPU.
Writes ``benchmarks/results/gap_alone_<policy>[_<layers>x<width>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import floor  # noqa: E402
import throughput  # noqa: E402


def _ms_per_step(step: Callable[[int], None], warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - t0) / steps * 1e3


def _profile(step: Callable[[int], None], warmup: int, steps: int) -> tuple[dict[str, tuple[float, float]], float]:
    """Self CPU ms per step by op (calls per step, ms), and the wall ms per step, under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(warmup):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        wall = (time.perf_counter() - t0) / steps * 1e3
    return {e.key: (e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()}, wall


def _plain_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[int], None]:
    """A step of the plain PyTorch loop on ``model``: forward and backward per micro-batch (loss
    scaled by 1/m, gradients accumulated), then the optimizer."""
    opt = throughput.make_optimizer(model.parameters())
    m = throughput.MICROBATCHES

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        x, y = batches[i]
        for xs, ys in zip(x.chunk(m), y.chunk(m)):
            (throughput.loss_fn(model(xs), ys) / m).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="pipedream_2bw")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=throughput.WIDTH,
                    help="layer width; a small one (16) leaves the kernels next to nothing: Python's cost")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compiled", action="store_true",
                    help="also time the plain loop on the module, eager and torch.compile'd")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of --compiled")
    args = ap.parse_args()
    throughput.LAYERS = floor.LAYERS = args.layers  # the model ends after --layers (the loss follows the last)
    throughput.WIDTH = floor.WIDTH = args.width
    from lightning_asyncpipe.engine import PipelineEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{throughput.free_port()}", rank=0, world_size=1)
    batches = throughput.make_batches(args.warmup + args.steps)
    engine = PipelineEngine(throughput.build_model(), 1, args.policy, throughput.MICROBATCHES,
                            throughput.make_optimizer, throughput.loss_fn)  # fmt: skip
    kernels = floor.StageKernels(0, args.layers, throughput.MICROBATCHES)
    steps: dict[str, Callable[[int], None]] = {
        "floor": lambda i: kernels.step(0, 1),
        "engine": lambda i: engine.train_step(*batches[i]),
    }
    if args.compiled:
        steps["loop/eager"] = _plain_loop(throughput.build_model(), batches)
        compiled = torch.compile(throughput.build_model(), mode=args.compile_mode)
        t0 = time.perf_counter()
        steps["loop/compiled"] = _plain_loop(compiled, batches)
        steps["loop/compiled"](0)  # compiles forward and backward
        compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            times[name].append(_ms_per_step(steps[name], args.warmup, args.steps))
    ratios = [e / f for f, e in zip(times["floor"], times["engine"])]
    profiled = {name: _profile(steps[name], args.warmup, args.steps) for name in ("floor", "engine")}
    dist.destroy_process_group()

    med = {name: statistics.median(v) for name, v in times.items()}
    (f_ops, f_wall), (e_ops, e_wall) = profiled["floor"], profiled["engine"]
    f_in, e_in = sum(v[1] for v in f_ops.values()), sum(v[1] for v in e_ops.values())
    lines = [
        f"`python benchmarks/gap_alone.py --policy {args.policy} --layers {args.layers} --width {args.width} "
        f"--rounds {args.rounds}"
        f"{f' --compiled --compile-mode {args.compile_mode}' if args.compiled else ''}`: MLP {args.layers} x Linear({args.width}, {args.width}), batch {throughput.BATCH}, "
        f"{throughput.MICROBATCHES} micro-batches, one process, one thread; {args.warmup} warm-up + {args.steps} "
        f"timed steps per round, the contenders alternating; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}.",
        "",
        "| ms per step | floor (bare kernels) | contender | contender / floor |",
        "|---|---:|---:|---:|",
        f"| engine: median of {args.rounds} rounds | {med['floor']:.1f} | {med['engine']:.1f} | "
        f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}) |",
        *[
            f"| {name}: median of {args.rounds} rounds | {med['floor']:.1f} | {med[name]:.1f} | "
            f"{statistics.median(r):.3f} (rounds {min(r):.3f}-{max(r):.3f}) |"
            for name, r in ((n, [t / f for f, t in zip(times["floor"], times[n])]) for n in steps if "/" in n)
        ],
        f"| under the profiler: wall | {f_wall:.1f} | {e_wall:.1f} | |",
        f"| under the profiler: inside ops (self CPU) | {f_in:.1f} | {e_in:.1f} | |",
        f"| under the profiler: outside any op (Python, the profiler's own cost) | {f_wall - f_in:.1f} | "
        f"{e_wall - e_in:.1f} | |",
        "",
        *([f"`loop/*`: the plain loop on the same module (per micro-batch forward and backward, "
           f"`torch.optim.SGD`), eager and `torch.compile(mode={args.compile_mode!r})` (the first step, "
           f"compiling: {compile_s:.1f} s).", ""]
          if args.compiled else []),
        "Ops by the engine's extra self time (ms per step, under the profiler; calls per step):",
        "",
        "| op | floor | engine | extra |",
        "|---|---:|---:|---:|",
    ]
    keys = sorted(set(f_ops) | set(e_ops), key=lambda k: -(e_ops.get(k, (0, 0))[1] - f_ops.get(k, (0, 0))[1]))
    for k in keys[:16]:
        f, e = f_ops.get(k, (0, 0.0)), e_ops.get(k, (0, 0.0))
        lines.append(f"| `{k}` | {f[1]:.2f} (x{f[0]:.0f}) | {e[1]:.2f} (x{e[0]:.0f}) | {e[1] - f[1]:+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    suffix = "" if (args.layers, args.width) == (4, 1024) else f"_{args.layers}x{args.width}"
    if args.compiled:
        suffix += "_compiled" + ("" if args.compile_mode == "default" else f"_{args.compile_mode}")
    path = os.path.join(HERE, "results", f"gap_alone_{args.policy}{suffix}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".md", "w") as fh:
        fh.write(text)
    result: dict[str, Any] = {"args": vars(args), "ms_per_step": times, "ratios": ratios,
                              "profiled_ops": {"floor": f_ops, "engine": e_ops}}  # fmt: skip
    with open(path + ".json", "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
