"""Convergence of the character GPT under every policy against the synchronous one.

    python benchmarks/convergence.py               # 300 steps per policy, 2 stages
    python benchmarks/convergence.py --steps 60    # a quicker look
    python benchmarks/convergence.py --lr 1e-3 --policies pipedream_flush,pipedream_2bw  # another peak LR
    python benchmarks/convergence.py --stages 4 --val-every 25 --name convergence_adam \
        --policies pipedream_flush,pipedream_2bw,pipemare,pipeoptim,nesterov_async,pipedream_flush:nadam

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

Validation mode (``--val-every N``, issue 17): every N steps (and at the end) Lightning's validation
loop evaluates the held-out 10 % of the same text (StdlibText's val_dataloader, ``--val-batches``
batches of 32 windows), and the table and plot report that **validation loss** against steps and
against training seconds (wall-clock from the start of training minus the time spent inside the
validation runs). The reference is the synchronous ``pipedream_flush`` with AdamW; the table gives
each run's final validation loss relative to it. A validation run drains the pipeline (see
docs/user_guide.md): the asynchronous policies then restart their stream from the latest weights,
which is part of what is measured here.

A policy can name its optimizer: ``policy:adamw`` (the default) or ``policy:nadam``.
``nesterov_async`` needs torch.optim.NAdam (or Nesterov SGD), so it defaults to ``nadam``: NAdam with
the same peak LR, schedule, weight decay (decoupled), beta2 = 0.95, and beta1 = 0.99 (the value the
policy sets, the paper's); ``pipedream_flush:nadam`` is the synchronous run with that same optimizer,
a control that separates the optimizer's effect from the policy's.
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
OPTIMIZERS = ("adamw", "nadam")
NADAM_BETA1 = 0.99  # the momentum nesterov_async sets (the paper's); the synchronous NAdam control uses it too


def parse_run(spec: str) -> tuple[str, str]:
    """``"policy"`` or ``"policy:optimizer"`` -> (policy, optimizer); nesterov_async defaults to NAdam."""
    policy, _, optimizer = spec.partition(":")
    optimizer = optimizer or ("nadam" if policy == "nesterov_async" else "adamw")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{spec!r}: optimizer must be one of {OPTIMIZERS}")
    return policy, optimizer


def worker(policy: str, steps: int, out: str, lr: float, stages: int = 2, optimizer: str = "adamw",
           val_every: int = 0, val_batches: int = 16) -> None:  # fmt: skip
    import lightning as L
    import torch

    from chargpt import CharGPT, StdlibText
    from lightning_asyncpipe import AsyncPipeStrategy

    torch.set_num_threads(1)

    class NAdamGPT(CharGPT):
        """CharGPT with NAdam in place of AdamW: same peak LR, schedule (the same function), weight
        decay (decoupled, as AdamW's) and beta2; beta1 = 0.99."""

        def configure_optimizers(self) -> Any:
            config = super().configure_optimizers()
            hp = self.hparams
            opt = torch.optim.NAdam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay,
                                    betas=(NADAM_BETA1, 0.95), decoupled_weight_decay=True)  # fmt: skip
            schedule = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class ValRecorder(L.Callback):
        """Training loss per step and validation loss per validation run, against training seconds
        (wall-clock since the start of training minus the time inside validation runs, measured from
        after the drain that starts them)."""

        def __init__(self) -> None:
            self.train: list[tuple[int, float, float]] = []
            self.val: list[tuple[int, float, float]] = []
            self.start = self.val_start = 0.0
            self.in_val = 0.0

        def seconds(self) -> float:
            return time.perf_counter() - self.start - self.in_val

        def on_train_start(self, trainer: Any, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.train.append((trainer.global_step, float(loss), self.seconds()))

        def on_validation_epoch_start(self, trainer: Any, *args: Any) -> None:
            self.val_start = time.perf_counter()

        def on_validation_end(self, trainer: Any, *args: Any) -> None:
            if trainer.sanity_checking:
                return
            self.in_val += time.perf_counter() - self.val_start
            seconds = self.train[-1][2] if self.train else 0.0
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"]), seconds))

    if val_every:
        L.seed_everything(0)
        recorder = ValRecorder()
        trainer = L.Trainer(
            accelerator="cpu", devices=stages, max_steps=steps, logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=val_batches,
            strategy=AsyncPipeStrategy(policy=policy, microbatches=4, pipeline_metrics=False), callbacks=[recorder],
        )  # fmt: skip
        model_cls = NAdamGPT if optimizer == "nadam" else CharGPT
        model = model_cls(n_layer=4, n_embd=128, block_size=64, lr=lr)
        data = StdlibText(block_size=64, batch_size=32)
        trainer.fit(model, data)
        if not recorder.val or recorder.val[-1][0] != trainer.global_step:
            trainer.validate(model, data, verbose=False)  # the final weights, when N does not divide steps
        if trainer.global_rank == 0:
            with open(out, "w") as f:
                json.dump({"train": recorder.train, "val": recorder.val}, f)
        return
    assert optimizer == "adamw", "the training-loss mode runs examples/chargpt.py's AdamW"

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
        accelerator="cpu", devices=stages, max_steps=steps, logger=False, enable_progress_bar=False,
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


def run_worker(spec: str, a: argparse.Namespace) -> Any:
    """One policy's training in its own processes (Lightning launches the stages); its records."""
    policy, optimizer = parse_run(spec)
    rows = os.path.join(a.out, f".convergence-{spec.replace(':', '-')}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", policy, "--optimizer", optimizer, "--steps",
           str(a.steps), "--rows", rows, "--lr", str(a.lr), "--stages", str(a.stages), "--val-every", str(a.val_every),
           "--val-batches", str(a.val_batches)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    done = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, timeout=3600, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{spec} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    with open(rows) as f:
        records = json.load(f)
    os.remove(rows)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--image", default=None, help="default: docs/images/convergence_gpt.png, or <name>.png")
    p.add_argument("--name", default="convergence", help="file name of the results (and of the plot, if not the default)")
    p.add_argument("--worker", default=None)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None)
    p.add_argument("--lr", type=float, default=LR, help="peak AdamW learning rate (examples/chargpt.py's default)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated policy[:adamw|nadam]; must include {SYNC} (with AdamW)")  # fmt: skip
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (one process each)")
    p.add_argument("--val-every", type=int, default=0,
                   help="validation loss every N steps and at the end (0: training loss only, the original mode)")  # fmt: skip
    p.add_argument("--val-batches", type=int, default=16, help="validation batches of 32 windows (16: all 512)")
    p.add_argument("--replot", action="store_true", help="validation mode: table and plot again from <out>/<name>.json")
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.rows, a.lr, a.stages, a.optimizer, a.val_every, a.val_batches)
        return
    specs = a.policies.split(",")
    for spec in specs:
        try:
            parse_run(spec)
        except ValueError as e:
            p.error(str(e))
    if SYNC not in specs:
        p.error(f"--policies must include {SYNC}: the target comes from it")
    if a.image is None:
        a.image = os.path.join(ROOT, "docs", "images", "convergence_gpt.png" if a.name == "convergence" else f"{a.name}.png")
    os.makedirs(a.out, exist_ok=True)
    if a.replot:
        with open(os.path.join(a.out, f"{a.name}{'' if a.lr == LR else f'_lr{a.lr:g}'}.json")) as f:
            saved = json.load(f)
        for key in ("steps", "stages", "lr", "val_every", "val_batches"):
            setattr(a, key, saved[key])
        validation_report(a, saved["runs"])
        return
    if a.val_every:
        validation_comparison(a, specs)
        return
    if any(parse_run(s)[1] != "adamw" for s in specs):
        p.error("the training-loss mode runs AdamW only; use --val-every for NAdam runs")
    suffix = "" if a.lr == LR else f"_lr{a.lr:g}"
    runs: dict[str, list[list[float]]] = {}
    for policy in specs:
        runs[policy] = run_worker(policy, a)
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
        f"Character GPT (4 blocks, n_embd 128, context 64, batch 32, AdamW peak LR {a.lr:g}), {a.stages} stages, 4 micro-batches, {a.steps} "
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
    with open(os.path.join(a.out, f"{a.name}{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"{a.name}{suffix}.json"), "w") as f:
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
    fig.suptitle(f"Character GPT, {a.stages} stages, 4 micro-batches, peak LR {a.lr:g}: each policy against the synchronous one")
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.image), exist_ok=True)
    image = a.image if not suffix else a.image.replace(".png", f"{suffix}.png")
    fig.savefig(image, dpi=110)
    print("wrote", image)


def validation_comparison(a: argparse.Namespace, specs: list[str]) -> None:
    """Validation loss of every run against steps and training seconds; table, JSON and plot."""
    suffix = "" if a.lr == LR else f"_lr{a.lr:g}"
    runs: dict[str, Any] = {}
    for spec in specs:
        started = time.perf_counter()
        runs[spec] = run_worker(spec, a)
        val = runs[spec]["val"]
        print(f"{spec:22s} final val loss {val[-1][1]:.4f} at step {val[-1][0]}, {val[-1][2]:.1f} s training "
              f"({time.perf_counter() - started:.0f} s with start-up and validation)", flush=True)  # fmt: skip
    validation_report(a, runs)


def validation_report(a: argparse.Namespace, runs: dict[str, Any]) -> None:
    """Table, JSON and plot of the validation-mode runs (also from a saved JSON: ``--replot``)."""
    suffix = "" if a.lr == LR else f"_lr{a.lr:g}"
    ref = runs[SYNC]["val"][-1][1]
    summary = []
    for spec, rec in runs.items():
        policy, optimizer = parse_run(spec)
        step, loss, seconds = rec["val"][-1]
        train = rec["train"]
        summary.append({"run": spec, "policy": policy, "optimizer": optimizer, "final_val_loss": loss,
                        "vs_sync": loss / ref, "steps": step, "train_seconds": seconds,
                        "seconds_per_step": seconds / max(1, len(train)),
                        "final_train_loss_ema": ema([r[1] for r in train])[-1] if train else None,
                        "val_curve": rec["val"]})  # fmt: skip
    opt_name = {"adamw": "AdamW", "nadam": f"NAdam (beta1 {NADAM_BETA1})"}
    lines = [
        f"Character GPT (examples/chargpt.py: 4 blocks, n_embd 128, context 64, batch 32), {a.stages} stages, "
        f"4 micro-batches, {a.steps} steps, peak LR {a.lr:g} (20-step warm-up, cosine decay to 10 %), weight decay "
        f"0.01, Lightning Trainer, one thread per process, same data, seed and initial weights. Validation loss: "
        f"{a.val_batches * 32} held-out windows, every {a.val_every} steps and at the end. Reference: "
        f"{SYNC} with AdamW, final validation loss {ref:.4f}.",
        "",
        "| run | optimizer | final val loss | vs sync | within 1 %? | steps | training s | s/step |",
        "|---|---|---:|---:|:---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(f"| {s['run']} | {opt_name[s['optimizer']]} | {s['final_val_loss']:.4f} | {s['vs_sync']:.4f} | "
                     f"{'yes' if s['vs_sync'] <= 1.01 else 'no'} | {s['steps']} | {s['train_seconds']:.1f} | "
                     f"{s['seconds_per_step'] * 1e3:.0f} ms |")  # fmt: skip
    within = [s["run"] for s in summary if s["policy"] in ("pipeoptim", "nesterov_async") and s["vs_sync"] <= 1.01]
    two_bw = next((s for s in summary if s["run"] == "pipedream_2bw"), None)
    if two_bw is not None:
        lines += ["", f"Goal (issue 17): Adam-aware runs within 1 % of the synchronous validation loss at {a.steps} "
                  f"steps: {', '.join(within) or 'none'}; pipedream_2bw: {two_bw['vs_sync']:.4f}x "
                  f"({'within' if two_bw['vs_sync'] <= 1.01 else 'not within'} 1 %)."]  # fmt: skip
    with open(os.path.join(a.out, f"{a.name}{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"{a.name}{suffix}.json"), "w") as f:
        json.dump({"steps": a.steps, "stages": a.stages, "lr": a.lr, "val_every": a.val_every,
                   "val_batches": a.val_batches, "reference": ref, "summary": summary, "runs": runs}, f)  # fmt: skip
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    for spec, rec in runs.items():
        val = rec["val"]
        style = dict(label=spec, lw=1.4, marker="o", ms=3, ls="--" if spec.endswith(":nadam") else "-")
        if spec == SYNC:
            style.update(color="black", lw=2)
        by_step.plot([r[0] for r in val], [r[1] for r in val], **style)
        by_time.plot([r[2] for r in val], [r[1] for r in val], **style)
    for ax, xlabel in ((by_step, "step"), (by_time, "training wall-clock seconds (shared 2-core machine)")):
        ax.axhline(ref * 1.01, color="grey", ls=":", lw=1, label="sync final + 1 %" if ax is by_step else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        lows = [r[1] for rec in runs.values() for r in rec["val"]]
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.05)
    by_step.legend(fontsize=8)
    fig.suptitle(f"Character GPT, {a.stages} stages, 4 micro-batches, peak LR {a.lr:g}: validation loss "
                 f"(AdamW unless ':nadam')")  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.image), exist_ok=True)
    image = a.image if not suffix else a.image.replace(".png", f"{suffix}.png")
    fig.savefig(image, dpi=110)
    print("wrote", image)


if __name__ == "__main__":
    main()
