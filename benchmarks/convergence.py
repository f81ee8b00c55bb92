"""Convergence of the character GPT under every policy against the synchronous one.

    python benchmarks/convergence.py               # 300 steps per policy, 2 stages
    python benchmarks/convergence.py --steps 60    # a quicker look
    python benchmarks/convergence.py --lr 1e-3 --policies pipedream_flush,pipedream_2bw  # another peak LR

Each policy trains the main job's model (examples/chargpt.py: 4 blocks, n_embd 128, context 64,
batch 32, AdamW with warm-up and cosine decay) on the same data from the same initial weights,
through Lightning's Trainer with 2 stages and 4 micro-batches, one thread per process. Rank 0 (the
last stage) records the training loss and the wall-clock time of every step. Outputs:
``benchmarks/results/convergence.{json,md}`` and ``docs/images/convergence_gpt.png`` (loss
against steps and against seconds). ``pipelined_backprop`` is left out: it needs SGD with momentum,
the GPT trains with AdamW.

Time to target: the target is the synchronous run's smoothed loss (EMA 0.9) at the end, plus
2%; each policy's first step whose smoothed loss reaches it, in steps and in seconds, as ratios
against the synchronous run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ["pipedream_flush", "gpipe", "pipedream", "pipedream_2bw", "pipemare"]
SYNC = "pipedream_flush"
LR = 3e-3  # examples/chargpt.py's default peak learning rate


def worker(policy: str, steps: int, out: str, lr: float) -> None:
    import lightning as L
    import torch

    from chargpt import CharGPT, StdlibText
    from lightning_asyncpipe import AsyncPipeStrategy

    torch.set_num_threads(1)

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, float, float]] = []
            self.start = 0.0

        def on_train_start(self, trainer: Any, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.rows.append((trainer.global_step, float(loss), time.perf_counter() - self.start))

    L.seed_everything(0)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        strategy=AsyncPipeStrategy(policy=policy, microbatches=4, pipeline_metrics=False), callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(CharGPT(n_layer=4, n_embd=128, block_size=64, lr=lr), StdlibText(block_size=64, batch_size=32))
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump(recorder.rows, f)


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    out, s = [], values[0]
    for v in values:
        s = decay * s + (1 - decay) * v
        out.append(s)
    return out


def first_reaching(smoothed: list[float], target: float) -> Optional[int]:
    return next((i for i, v in enumerate(smoothed) if v <= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--image", default=os.path.join(ROOT, "docs", "images", "convergence_gpt.png"))
    p.add_argument("--worker", default=None)
    p.add_argument("--rows", default=None)
    p.add_argument("--lr", type=float, default=LR, help="peak AdamW learning rate (examples/chargpt.py's default)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated; must include {SYNC}")
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.rows, a.lr)
        return
    policies = a.policies.split(",")
    if SYNC not in policies:
        p.error(f"--policies must include {SYNC}: the target comes from it")
    suffix = "" if a.lr == LR else f"_lr{a.lr:g}"
    os.makedirs(a.out, exist_ok=True)
    runs: dict[str, list[list[float]]] = {}
    for policy in policies:
        rows = os.path.join(a.out, f".convergence-{policy}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", policy, "--steps", str(a.steps), "--rows", rows,
               "--lr", str(a.lr)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
        subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, check=True, timeout=3600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        with open(rows) as f:
            runs[policy] = json.load(f)
        os.remove(rows)
        print(f"{policy:16s} final loss {runs[policy][-1][1]:.3f} in {runs[policy][-1][2]:.1f} s", flush=True)

    smoothed = {k: ema([r[1] for r in v]) for k, v in runs.items()}
    target = smoothed[SYNC][-1] * 1.02
    summary = []
    for policy, rows in runs.items():
        i = first_reaching(smoothed[policy], target)
        summary.append({"policy": policy, "final_loss_ema": smoothed[policy][-1], "seconds": rows[-1][2],
                        "seconds_per_step": rows[-1][2] / len(rows),
                        "steps_to_target": None if i is None else rows[i][0], "seconds_to_target": None if i is None
                        else rows[i][2]})  # fmt: skip
    sync = next(s for s in summary if s["policy"] == SYNC)
    lines = [
        f"Character GPT (4 blocks, n_embd 128, context 64, batch 32, AdamW peak LR {a.lr:g}), 2 stages, 4 micro-batches, {a.steps} "
        f"steps, Lightning Trainer, one thread per process. Target: {target:.3f} (the synchronous run's final "
        "smoothed loss + 2%).",
        "",
        "| policy | final loss (EMA) | s/step | steps to target | seconds to target | steps vs sync | time vs sync |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        reached = s["steps_to_target"] is not None
        ratio_steps = f"{s['steps_to_target'] / sync['steps_to_target']:.2f}x" if reached else "not reached"
        ratio_time = f"{s['seconds_to_target'] / sync['seconds_to_target']:.2f}x" if reached else "not reached"
        lines.append(f"| {s['policy']} | {s['final_loss_ema']:.3f} | {s['seconds_per_step'] * 1e3:.0f} ms | "
                     f"{s['steps_to_target'] if reached else '-'} | "
                     f"{'%.1f' % s['seconds_to_target'] if reached else '-'} | {ratio_steps} | {ratio_time} |")  # fmt: skip
    with open(os.path.join(a.out, f"convergence{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"convergence{suffix}.json"), "w") as f:
        json.dump({"steps": a.steps, "lr": a.lr, "target": target, "summary": summary, "runs": runs}, f)
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, rows in runs.items():
        by_step.plot([r[0] for r in rows], smoothed[policy], label=policy, lw=1.2)
        by_time.plot([r[2] for r in rows], smoothed[policy], label=policy, lw=1.2)
    for ax, xlabel in ((by_step, "step"), (by_time, "wall-clock seconds")):
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (EMA 0.9)")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle(f"Character GPT, 2 stages, 4 micro-batches, peak LR {a.lr:g}: each policy against the synchronous one")
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.image), exist_ok=True)
    image = a.image if not suffix else a.image.replace(".png", f"{suffix}.png")
    fig.savefig(image, dpi=110)
    print("wrote", image)


if __name__ == "__main__":
    main()
