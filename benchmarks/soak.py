"""Soak: thousands of asynchronous steps through Lightning hold memory, file descriptors and threads flat.

    python benchmarks/soak.py                         # 2000 steps, 4 stages, pipedream_2bw
    python benchmarks/soak.py --steps 300 --policy pipemare --out /tmp/soak.json

Every stage process samples its resident set size (``/proc/self/statm``), open file descriptors
(``/proc/self/fd``) and threads (``/proc/self/task``) every ``--every`` steps. After ``--warmup``
steps (allocator pools, shape caches and Lightning's own state have settled) the RSS growth to the
end of the run, ``(last - at warm-up) / at warm-up``, must stay under ``--max-growth`` (5%) on every
stage, and the descriptor and thread counts must not grow. Writes a JSON report
(``benchmarks/results/soak.json`` by default), prints a table and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_asyncpipe import AsyncPipeStrategy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class SoakModel(L.LightningModule):
    """A small MLP: 4 stages of two layers each."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sampler(L.Callback):
    """Samples RSS, descriptors and threads of this process every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            gc.collect()
            self.samples.append({"step": step, "rss": _rss_bytes(), "fds": len(os.listdir("/proc/self/fd")),
                                 "threads": len(os.listdir("/proc/self/task")), "time": time.perf_counter()})  # fmt: skip


def summarize(samples: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    """Growth after warm-up of one process's samples."""
    settled = [s for s in samples if s["step"] >= warmup]
    first, last = settled[0], settled[-1]
    return {
        "rss_at_warmup_mib": first["rss"] / 2**20, "rss_end_mib": last["rss"] / 2**20,
        "rss_growth": (last["rss"] - first["rss"]) / first["rss"],
        "rss_max_mib": max(s["rss"] for s in settled) / 2**20,
        "fds": [first["fds"], last["fds"]], "threads": [first["threads"], last["threads"]],
        "steps_per_s": (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--policy", default="pipedream_2bw")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g))
    sampler = Sampler(args.every)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.stages, max_steps=args.steps, callbacks=[sampler], logger=False,
        strategy=AsyncPipeStrategy(policy=args.policy, microbatches=4), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50,
    )  # fmt: skip
    trainer.fit(SoakModel(), DataLoader(data, batch_size=32, shuffle=True))
    summary = {**summarize(sampler.samples, args.warmup), "rank": trainer.global_rank,
               "stage": trainer.strategy.stage}  # type: ignore[attr-defined]  # fmt: skip
    everyone: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(everyone, summary)
    if trainer.global_rank != 0:
        return
    ok = all(s["rss_growth"] < args.max_growth and s["fds"][1] <= s["fds"][0] and s["threads"][1] <= s["threads"][0]
             for s in everyone)  # fmt: skip
    report = {"policy": args.policy, "stages": args.stages, "steps": args.steps, "warmup": args.warmup,
              "max_growth": args.max_growth, "ok": ok, "processes": sorted(everyone, key=lambda s: s["stage"])}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"soak: {args.policy}, {args.stages} stages, {args.steps} steps (growth measured from step {args.warmup})")
    print("| stage | RSS at warm-up (MiB) | RSS at end (MiB) | growth | fds | threads | steps/s |")
    print("|---|---|---|---|---|---|---|")
    for s in report["processes"]:
        print(f"| {s['stage']} | {s['rss_at_warmup_mib']:.1f} | {s['rss_end_mib']:.1f} | {100 * s['rss_growth']:+.2f}% "
              f"| {s['fds'][0]} -> {s['fds'][1]} | {s['threads'][0]} -> {s['threads'][1]} | {s['steps_per_s']:.0f} |")
    print("soak:", "PASS" if ok else f"FAIL (RSS growth >= {100 * args.max_growth:.0f}% or descriptors/threads grew)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
