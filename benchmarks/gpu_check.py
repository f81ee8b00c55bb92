"""What one GPU can check (issue 16, point 5), in a few minutes; never a test.

    bash benchmarks/gpu_check.sh                          # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --quick   # the same code on the CPU: a smoke run

One GPU holds one stage: NCCL refuses two ranks on one device ("Duplicate GPU detected") and gloo
sends only CPU tensors, so the transfers between stages cannot be exercised on one GPU. What the
engine does *on* a device can: every policy's weight versions (stashes, double buffers, PipeMare's
corrections, PipeOptim's predictions), the deferred weight gradients, the optimizer and the
scheduler, on CUDA tensors, one stage per process (a gloo world of one).

1. Environment: torch, CUDA, the device.
2. Exactness: every case of ``tests/helpers/engine_cases.py`` with one stage (each policy with 1
   and 2 micro-batches, SGD with momentum and AdamW; NAdam and Nesterov SGD for
   ``nesterov_async``), 12 batches with a drain after the third, the engine on the device against
   the executable specification (``reference.py``) on the CPU: the largest weight difference
   against ``tests/helpers/tolerance.py``'s bound, and the delays the policy reports.
3. Speed and memory on the device: ``throughput.py``'s MLP (8 x Linear(1024, 1024), batch 256,
   8 micro-batches, SGD with momentum) as one stage, every policy, against a plain autograd loop
   on the whole batch and the bare kernels (``floor.py``'s ``StageKernels``, no autograd, no
   engine) on the same device: samples/s (median of rounds), peak allocated memory, the policy's
   stashed weights.

Prints a Markdown report and writes it to ``benchmarks/results/gpu_check[_cpu].md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from floor import StageKernels  # noqa: E402
from throughput import BATCH, LAYERS, MICROBATCHES, WIDTH, build_model, free_port, loss_fn, make_batches, make_optimizer  # noqa: E402

from lightning_asyncpipe.engine import PipelineEngine  # noqa: E402
from lightning_asyncpipe.reference import reference_train  # noqa: E402
from tests.helpers import engine_cases as C  # noqa: E402
from tests.helpers.tolerance import training_atol  # noqa: E402

POLICIES = ["gpipe", "pipedream_flush", "zero_bubble", "pipedream", "pipedream_2bw", "pipemare", "pipeoptim"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> list[str]:
    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"- {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")  # fmt: skip
    else:
        lines.append(f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (smoke run)")
    return lines


def exactness(device: torch.device, quick: bool) -> tuple[list[str], bool]:
    """The one-stage engine on ``device`` against the specification on the CPU, every case."""
    lines = ["| case | max abs diff | bound | delays as the spec's | largest delay | ok |", "|---|---:|---:|---|---:|---|"]
    all_ok = True
    cases = C.cases(1)
    if quick:
        cases = [c for c in cases if c.optimizer == "adamw" and c.microbatches == 1] or cases[:3]
    data = C.batches()
    for case in cases:
        engine = PipelineEngine(C.model(), n_stages=1, policy=case.policy, policy_options=case.options,
                                microbatches=case.microbatches, device=device, **C.engine_kwargs(case))  # fmt: skip
        for k, (x, y) in enumerate(data):
            engine.train_step(x.to(device), y.to(device), drain=k in C.DRAIN_AFTER or k == len(data) - 1)
        state = {k: v.detach().cpu() for k, v in engine.stage_state_dict().items()}
        delays = engine.policy.report().delays
        engine.executor.close()
        ref = reference_train(C.model(), [len(C.model())], case.policy, data, case.microbatches, C.loss_fn,
                              C.optimizer(case.optimizer), C.scheduler, drain_after=C.DRAIN_AFTER,
                              policy_options=case.options)  # fmt: skip
        diff = max(float((state[n] - v).abs().max()) for n, v in ref.state_dict.items())
        bound = training_atol(ref.state_dict, C.N_STEPS)
        ok = state.keys() == ref.state_dict.keys() and diff <= bound and [delays] == ref.delays
        all_ok &= ok
        lines.append(f"| {case.name} | {diff:.2e} | {bound:.2e} | {'yes' if [delays] == ref.delays else 'NO'} | "
                     f"{max(delays, default=0)} | {'yes' if ok else 'NO'} |")  # fmt: skip
    return lines, all_ok


def _rate(step: Callable[[int], None], device: torch.device, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    return steps * BATCH / (time.perf_counter() - t0)


def speed(device: torch.device, rounds: int, warmup: int, steps: int) -> list[str]:
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(warmup + steps)]
    rates: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    stashed: dict[str, float] = {}

    def measure(name: str, build: Callable[[], Callable[[int], None]]) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step = build()
        rates.setdefault(name, []).append(_rate(step, device, warmup, steps))
        if device.type == "cuda":
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)

    def plain() -> Callable[[int], None]:
        model = build_model().to(device)
        opt = make_optimizer(model.parameters())

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(batches[i][0]), batches[i][1]).backward()
            opt.step()

        return step

    def kernels(m: int) -> Callable[[], Callable[[int], None]]:
        def build() -> Callable[[int], None]:
            k = StageKernels(0, LAYERS, m, device=device)
            return lambda i: k.step(0, 1)

        return build

    def engine(policy: str) -> Callable[[], Callable[[int], None]]:
        def build() -> Callable[[int], None]:
            e = PipelineEngine(build_model(), 1, policy, MICROBATCHES, make_optimizer, loss_fn, device=device)

            def step(i: int) -> None:
                e.train_step(*batches[i])
                stashed[policy] = max(stashed.get(policy, 0.0), e.policy.report().peak_stashed_bytes / 2**20)

            return step

        return build

    contenders = [("autograd/whole batch", plain), ("kernels/whole batch", kernels(1)),
                  (f"kernels/m{MICROBATCHES}", kernels(MICROBATCHES))]  # fmt: skip
    contenders += [(f"engine/{p}", engine(p)) for p in POLICIES]
    for r in range(rounds):
        for name, build in contenders:
            measure(name, build)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()), flush=True)
    base = statistics.median(rates["autograd/whole batch"])
    lines = ["| contender | samples/s (median) | min-max | vs autograd | peak allocated MiB | stashed MiB |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, _ in contenders:
        v = rates[name]
        policy = name.split("/", 1)[1]
        peak = f"{peaks[name]:.0f}" if name in peaks else "-"  # CUDA's allocator only
        stash = f"{stashed[policy]:.1f}" if policy in stashed else "-"
        lines.append(f"| {name} | {statistics.median(v):.0f} | {min(v):.0f}-{max(v):.0f} | "
                     f"{statistics.median(v) / base:.2f}x | {peak} | {stash} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a few cases and steps (the CPU smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu for a smoke run of the same code.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    started = time.perf_counter()
    report = [f"# GPU check ({args.device}{', quick' if args.quick else ''})", "", *environment(device), ""]
    lines, ok = exactness(device, args.quick)
    report += ["## One stage on the device equals the specification", "", *lines, "",
               f"All cases within the bound: {'yes' if ok else 'NO'}.", ""]  # fmt: skip
    rounds, warmup, steps = (1, 2, 3) if args.quick else (args.rounds, 5, 30)
    report += [f"## Speed and memory, one stage: MLP {LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, "
               f"{MICROBATCHES} micro-batches; {warmup} warm-up + {steps} timed steps, median of {rounds} rounds", "",
               *speed(device, rounds, warmup, steps), "", f"Wall time {time.perf_counter() - started:.0f} s."]  # fmt: skip
    text = "\n".join(report) + "\n"
    print(text)
    out = os.path.join(HERE, "results", "gpu_check" + ("" if device.type == "cuda" else "_cpu") + ".md")
    with open(out, "w") as f:
        f.write(text)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
