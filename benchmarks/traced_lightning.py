"""End to end through Lightning: the main job's GPT as written (nanoGPT-style, captured and split)
against the same layers as an ``nn.Sequential`` (``benchmarks/gpt_sequential.py``), same run.

    python benchmarks/traced_lightning.py                  # 3 rounds, pipedream_2bw, 2 stages
    python benchmarks/traced_lightning.py --rounds 5 --policy pipedream_flush

Each fit is its own launch (2 processes x 1 thread, ``Trainer(strategy=AsyncPipeStrategy(...))``,
batch 32 x 64 tokens, 4 micro-batches); the two forms alternate in every round. samples/s counts
the steps after ``--warmup`` (timed on rank 0 from the start of the first counted step to the end
of fit, the final drain included). The nanoGPT form keeps its head tied to the embedding (one
weight-sized message each way per update), the Sequential form has an untied copy.
Writes ``benchmarks/results/traced_lightning.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
BATCH, MICROBATCHES = 32, 4


def child(form: str, policy: str, steps: int, warmup: int, out: str) -> None:
    import lightning as L
    import torch

    from examples.chargpt import CharGPT, StdlibText
    from gpt_sequential import sequential_gpt
    from lightning_asyncpipe import AsyncPipeStrategy

    torch.set_num_threads(1)

    class Clock(L.Callback):
        start = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):  # type: ignore[no-untyped-def]
            if trainer.global_rank == 0:
                seconds = time.perf_counter() - self.start
                with open(out, "w") as f:
                    json.dump({"samples_per_s": (steps - warmup) * BATCH / seconds}, f)

    L.seed_everything(0)
    model = CharGPT(n_layer=4, n_embd=128, block_size=64)
    if form == "sequential":
        model.model = sequential_gpt(model.model)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=AsyncPipeStrategy(policy=policy, microbatches=MICROBATCHES,
                                                                 pipeline_metrics=False),
        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
    )  # fmt: skip
    trainer.fit(model, StdlibText(max_bytes=300_000, block_size=64, batch_size=BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--policy", default="pipedream_2bw")
    parser.add_argument("--child", nargs=2, metavar=("FORM", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.policy, args.steps, args.warmup, args.child[1])
        return
    results: dict[str, list[float]] = {"sequential": [], "traced": []}
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "_traced_lightning_child.json")
    for r in range(args.rounds):
        for form in results:
            cmd = [sys.executable, __file__, "--policy", args.policy, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--child", form, tmp]  # fmt: skip
            subprocess.run(cmd, check=True, timeout=600, capture_output=True)
            with open(tmp) as f:
                results[form].append(json.load(f)["samples_per_s"])
            print(f"round {r}: {form} {results[form][-1]:.1f} samples/s", flush=True)
    os.remove(tmp)
    seq, traced = statistics.median(results["sequential"]), statistics.median(results["traced"])
    import torch

    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "policy": args.policy,
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    with open(os.path.join(out, "traced_lightning.json"), "w") as f:
        json.dump({"meta": meta, "samples_per_s": results, "traced_over_sequential": traced / seq}, f, indent=1)
    with open(os.path.join(out, "traced_lightning.md"), "w") as f:
        f.write(f"{args.policy}, 2 stages x 1 thread, batch {BATCH} x 64 tokens, {MICROBATCHES} micro-batches, "
                f"{args.steps - args.warmup} timed steps after {args.warmup}, median of {args.rounds} rounds; "
                f"torch {torch.__version__}\n\n| form | samples/s (median) | rounds |\n|---|---:|---|\n"
                f"| Sequential (same layers) | {seq:.1f} | {', '.join(f'{x:.1f}' for x in results['sequential'])} |\n"
                f"| nanoGPT as written (captured) | {traced:.1f} | {', '.join(f'{x:.1f}' for x in results['traced'])} |\n"
                f"| traced / Sequential | {traced / seq:.3f} | |\n")
    print(f"traced / sequential: {traced / seq:.3f}")


if __name__ == "__main__":
    main()
