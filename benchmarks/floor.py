"""The kernel floor: how fast can *any* implementation run the MLP's work, split as the issue asks?

    python benchmarks/floor.py                    # 8 micro-batches, 5 rounds (about 2 min)
    python benchmarks/floor.py --microbatches 2   # the same batch in 2 micro-batches of 128 rows

``benchmarks/throughput.py`` measures this project's engine against its *ceiling* (the engine with the
transfers taken out). The ceiling still runs the engine: autograd, Python, the policy. This probe
strips all of that away and keeps only the arithmetic a 2-stage pipeline of the benchmark's MLP
(8 x Linear(1024, 1024) with ReLU, MSE, SGD with momentum; batch 256) must do on each stage, written
directly as tensor kernels:

- per micro-batch, forward: ``addmm`` + ``relu`` for each layer of the stage;
- per micro-batch, backward: the ReLU mask and the input-gradient GEMM ``g @ W`` (not for the
  first layer of stage 0, whose input needs no gradient); the last stage also forms the MSE gradient;
- once per batch: the weight gradients as one 256-row GEMM per layer from the stored inputs and
  output gradients (what ``lightning_asyncpipe/wgrad.py`` does; the cheapest way), the bias sums,
  and SGD with momentum as three ``_foreach`` kernels.

No autograd, no transfers (stage 1 reads a fixed input, stage 0 a fixed incoming gradient), no
waiting: both processes (one thread each) run their stage's kernels at the same time, in the 1F1B
order, between two barriers; the time is the slower one's. The same kernels over the whole model
in one process give the single-process floors: ``floor/single`` at 256 rows (the kernel content of
contender (a)), ``floor/single-m`` at the pipeline's micro-batch size. Contender (a) itself
(``autograd/single``: the plain PyTorch loop of ``throughput.py``) runs in the same rounds, and
once more with glibc's malloc told to keep freed memory (``autograd/single-tuned-malloc``: the
loop allocates its gradients and activations afresh every step, and each fresh 4 MiB block
page-faults again).

``floor/pipeline`` over ``autograd/single`` is an upper bound for any pipeline of this work on this
machine: a pipeline that does the same micro-batched arithmetic cannot be faster than its stages'
kernels running side by side with nothing else. Writes ``benchmarks/results/floor[_m<M>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from throughput import (  # noqa: E402
    BATCH, LAYERS, LR, MOMENTUM, WIDTH, build_model, loss_fn, make_batches, make_optimizer, uniform_counts,
)

STAGES = 2


class StageKernels:
    """The arithmetic of layers ``first .. last-1`` of the MLP on micro-batches of ``rows`` rows.

    Weight gradients are deferred: each micro-batch writes its layer inputs and output gradients
    into batch-sized buffers, and :meth:`update` forms every ``dW`` with one GEMM over the batch.
    """

    def __init__(self, first: int, last: int, microbatches: int, seed: int = 0,
                 device: Optional[torch.device] = None) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.first, self.last, self.m = first, last, microbatches
        self.rows = BATCH // microbatches
        n = last - first
        self.w = [torch.randn(WIDTH, WIDTH, generator=g) * WIDTH**-0.5 for _ in range(n)]
        self.b = [torch.zeros(WIDTH) for _ in range(n)]
        self.params = self.w + self.b
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.gy = [torch.empty(BATCH, WIDTH) for _ in range(n)]  # layer output gradients of the batch
        self.out = [torch.empty(BATCH, WIDTH) for _ in range(n)]  # layer outputs, after the ReLU
        self.input = torch.randn(BATCH, WIDTH, generator=g)  # stage 0: data; later stages: "received"
        self.target = torch.randn(BATCH, WIDTH, generator=g)
        self.incoming = torch.randn(BATCH, WIDTH, generator=g)  # the gradient a non-last stage "receives"
        if device is not None:  # drawn on the CPU (the same numbers anywhere), then moved
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(device))
                elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                    setattr(self, name, [t.to(device) for t in value])
            self.params = self.w + self.b

    def _rows(self, j: int) -> slice:
        return slice(j * self.rows, (j + 1) * self.rows)

    def _input(self, i: int) -> torch.Tensor:
        """The batch of inputs of the stage's layer ``i`` (written micro-batch by micro-batch)."""
        return self.input if i == 0 else self.out[i - 1]

    def forward(self, j: int) -> None:
        r = self._rows(j)
        for i in range(self.last - self.first):
            y = torch.addmm(self.b[i], self._input(i)[r], self.w[i].t(), out=self.out[i][r])
            if self.first + i < LAYERS - 1:  # ReLU after every layer but the model's last
                y.relu_()

    def backward(self, j: int) -> Optional[torch.Tensor]:
        """The backward of micro-batch ``j``; returns the gradient of the stage's input (None on stage 0)."""
        r = self._rows(j)
        n = self.last - self.first
        if self.last == LAYERS:  # d mse / d y, the loss of this micro-batch scaled as one of m
            g = torch.sub(self.out[n - 1][r], self.target[r], out=self.gy[n - 1][r])
            g.mul_(2.0 / (self.rows * WIDTH * self.m))
        else:
            g = self.incoming[r]
        for i in reversed(range(n)):
            if self.first + i < LAYERS - 1:  # through the ReLU: zero where its output is zero
                g = torch.ops.aten.threshold_backward.grad_input(g, self.out[i][r], 0.0, grad_input=self.gy[i][r])
            if self.first + i > 0:
                g = torch.mm(g, self.w[i])
        return g if self.first > 0 else None

    def update(self) -> None:
        n = self.last - self.first
        for i in range(n):
            torch.mm(self.gy[i].t(), self._input(i), out=self.grads[i])
            torch.sum(self.gy[i], 0, out=self.grads[n + i])
        torch._foreach_mul_(self.momentum, MOMENTUM)
        torch._foreach_add_(self.momentum, self.grads)
        torch._foreach_add_(self.params, self.momentum, alpha=-LR)

    def step(self, stage: int, n_stages: int) -> None:
        """One batch in the 1F1B order of stage ``stage``: warm-up forwards, F/B pairs, cool-down."""
        warm = min(n_stages - 1 - stage, self.m)
        for j in range(warm):
            self.forward(j)
        for j in range(warm, self.m):
            self.forward(j)
            self.backward(j - warm)
        for j in range(self.m - warm, self.m):
            self.backward(j)
        self.update()


def _stage_bounds(stage: int, n_stages: int) -> tuple[int, int]:
    """The layers of ``stage`` in throughput.py's (and the engine's uniform) split."""
    counts = uniform_counts(LAYERS, n_stages)
    return sum(counts[:stage]), sum(counts[: stage + 1])


def _worker(kind: str, rank: int, world: int, m: int, warmup: int, steps: int, barrier: Any, queue: Any) -> None:
    torch.set_num_threads(1)
    if kind == "autograd":
        model, batches = build_model(), make_batches(1)
        opt = make_optimizer(model.parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(batches[0][0]), batches[0][1]).backward()
            opt.step()
    else:
        first, last = _stage_bounds(rank, world) if world > 1 else (0, LAYERS)
        kernels = StageKernels(first, last, m, seed=rank)

        def step() -> None:
            kernels.step(rank, world)

    for _ in range(warmup):
        step()
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    barrier.wait()
    queue.put(elapsed)


# glibc returns freed blocks of 4 MiB and more to the OS (mmap/trim), so every fresh weight-sized
# tensor page-faults again; with these thresholds raised it keeps them (read at process start)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def launch(kind: str, world: int, m: int, warmup: int, steps: int, env: dict[str, str]) -> float:
    """Samples/s of ``steps`` batches, the slowest of ``world`` processes started together."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, r, world, m, warmup, steps, barrier, queue)) for r in range(world)]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child starts with the parent's environment
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    times = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"{kind} worker exited with {p.exitcode}")
    return steps * BATCH / max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    m = args.microbatches
    contenders = [  # name, kind, processes, micro-batches, environment
        ("autograd/single", "autograd", 1, 1, {}),
        ("autograd/single-tuned-malloc", "autograd", 1, 1, TUNED_MALLOC),
        ("floor/single", "kernels", 1, 1, {}),
        (f"floor/single-m{m}", "kernels", 1, m, {}),
        (f"floor/pipeline-m{m}", "kernels", STAGES, m, {}),
    ]
    samples: dict[str, list[float]] = {c[0]: [] for c in contenders}
    for r in range(args.rounds):
        for name, kind, world, mb, env in contenders:
            samples[name].append(launch(kind, world, mb, args.warmup, args.steps, env))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in samples.items()), flush=True)

    base = samples["autograd/single"]
    pipe = samples[f"floor/pipeline-m{m}"]
    per_round = [p / a for p, a in zip(pipe, base)]
    lines = [
        f"Kernel floor of the MLP ({LAYERS} x Linear({WIDTH}, {WIDTH}), batch {BATCH}, {m} micro-batches of "
        f"{BATCH // m} rows, {STAGES} stages), {args.warmup} warm-up + {args.steps} timed steps, median of "
        f"{args.rounds} rounds, one thread per process; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        "| contender | processes | samples/s (median) | min-max | vs autograd/single |",
        "|---|---|---:|---:|---:|",
    ]
    for name, _, world, _, _ in contenders:
        v = samples[name]
        med = statistics.median(v)
        lines.append(f"| {name} | {world} x 1 thread | {med:.1f} | {min(v):.1f}-{max(v):.1f} | "
                     f"{med / statistics.median(base):.2f}x |")  # fmt: skip
    lines += ["", f"Per round, `floor/pipeline-m{m}` / `autograd/single`: "
              + ", ".join(f"{x:.2f}" for x in per_round) + f" (median {statistics.median(per_round):.2f}x)."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(HERE, "results", "floor" + ("" if m == 8 else f"_m{m}"))
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump({"microbatches": m, "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
                   "samples_per_s": samples, "pipeline_over_autograd_per_round": per_round}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
