"""Balanced partitions: ``balance="time"`` against ``"uniform"`` and ``"parameters"`` on a model
whose layers differ wildly in cost, through Lightning's Trainer, 2 stages, one thread per process.

    python benchmarks/balance.py            # 5 warm-up + 20 timed steps, 3 repeats per balance
    python benchmarks/balance.py --quick    # 2 + 5 steps, 1 repeat

The model (12 layers, hidden 256): ``Linear(256, 4096)``, ReLU, ``Linear(4096, 256)``, ReLU, a
parameter-free random-feature block (``relu(x P) P^T`` with a fixed 256 x 8192 buffer ``P``: about
the compute of both wide layers together, no parameters), then seven cheap layers (four
``Linear(256, 256)`` with ReLUs). ``uniform`` splits 6/6 and puts all the heavy layers on stage 0;
``parameters`` sees only the two wide layers and puts the feature block with the second one;
``time`` measures. Writes ``benchmarks/results/balance.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HIDDEN, WIDE, FEATURES, BATCH, MICROBATCHES = 256, 4096, 8192, 256, 8
BALANCES = ["uniform", "parameters", "time"]


class RandomFeatures(nn.Module):
    """``relu(x P) P^T / sqrt(k)`` with a fixed random ``P``: heavy compute, no parameters."""

    def __init__(self, dim: int, features: int) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(dim, features) / features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.proj) @ self.proj.t()


def build_layers() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(HIDDEN, WIDE), nn.ReLU(), nn.Linear(WIDE, HIDDEN), nn.ReLU(),
                               RandomFeatures(HIDDEN, FEATURES)]  # fmt: skip
    for i in range(4):
        layers.append(nn.Linear(HIDDEN, HIDDEN))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def worker(argv: list[str]) -> None:
    """One Lightning fit with one balance (run by main() for rank 0, by Lightning for rank 1)."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from lightning_asyncpipe import AsyncPipeStrategy

    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_layers()
            self.example_input_array = torch.zeros(BATCH, HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    class Batches(Dataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(1)
            self.batches = [(torch.randn(BATCH, HIDDEN, generator=g), torch.randn(BATCH, HIDDEN, generator=g))
                            for _ in range(n)]  # fmt: skip

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, i: int) -> Any:
            return self.batches[i]

    class Timer(L.Callback):
        t0 = elapsed = 0.0
        counts: list[int] = []

        def on_train_start(self, trainer: Any, *args: Any) -> None:
            self.counts = list(trainer.strategy._partition.counts)

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == a.warmup:
                torch.distributed.barrier()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == a.warmup + a.steps:
                torch.distributed.barrier()
                self.elapsed = time.perf_counter() - self.t0

    timer = Timer()
    strategy = AsyncPipeStrategy(policy="pipedream_2bw", microbatches=MICROBATCHES, balance=a.worker,
                                 pipeline_metrics=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=a.warmup + a.steps, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[timer])  # fmt: skip
    trainer.fit(Module(), DataLoader(Batches(a.warmup + a.steps), batch_size=None))
    if trainer.global_rank == 0:
        counts = timer.counts
        with open(a.out, "w") as f:
            json.dump({"elapsed_s": timer.elapsed, "counts": counts, "costs_ms": strategy.measured_costs and
                       [round(c * 1e3, 3) for c in strategy.measured_costs]}, f)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args()
    warmup, steps, repeats = (2, 5, 1) if a.quick else (5, 20, 3)
    steps = a.steps or steps
    os.makedirs(a.out, exist_ok=True)
    results = []
    for balance in BALANCES:
        runs = []
        for r in range(repeats):
            out = os.path.join(a.out, f".balance-{balance}-{r}.json")
            env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", balance, "--warmup", str(warmup),
                   "--steps", str(steps), "--out", out]  # fmt: skip
            subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, check=True, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            with open(out) as f:
                runs.append(json.load(f))
            os.remove(out)
        rates = [steps * BATCH / run["elapsed_s"] for run in runs]
        results.append({"balance": balance, "counts": runs[0]["counts"], "samples_per_s": statistics.median(rates),
                        "samples_per_s_runs": rates, "costs_ms": runs[0]["costs_ms"]})  # fmt: skip
        print(f"{balance:10s} counts {runs[0]['counts']}  {statistics.median(rates):8.1f} samples/s", flush=True)
    base = {r["balance"]: r["samples_per_s"] for r in results}
    lines = [
        f"Model: 12 layers (see benchmarks/balance.py), batch {BATCH}, {MICROBATCHES} micro-batches, 2 stages, "
        f"pipedream_2bw, Lightning Trainer, one thread per process; {warmup} warm-up + {steps} timed steps, median of "
        f"{repeats} run(s).",
        "",
        "| balance | layers per stage | samples/s (median) | vs uniform | vs parameters |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['balance']} | {r['counts']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / base['uniform']:.2f}x | {r['samples_per_s'] / base['parameters']:.2f}x |")  # fmt: skip
    timed = next(r for r in results if r["balance"] == "time")
    lines += ["", f"Measured forward + backward per layer (ms, one micro-batch): {timed['costs_ms']}"]
    with open(os.path.join(a.out, "balance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "balance.json"), "w") as f:
        json.dump({"warmup": warmup, "steps": steps, "repeats": repeats, "results": results}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
