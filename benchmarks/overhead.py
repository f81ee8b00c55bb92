"""Lightning's overhead over the raw engine, measured inside the runs rather than end to end.

    python benchmarks/overhead.py                      # pipedream_2bw and pipedream_flush, MLP, 2 stages
    python benchmarks/overhead.py --policies gpipe --steps 40 --rounds 5
    ASYNCPIPE_BENCH_MODEL=gpt python benchmarks/overhead.py   # the character GPT (batch 32, 4 micro-batches)

End-to-end samples/s on a shared 2-core host moves by 5-15 % between runs, more than the overhead
to be measured. Here both runs record, per stage and per step, the wall time of the step and the
time spent inside pipeline actions (forward, backward, update; from the executor's timings): the
time *outside* actions is what the code around the actions costs (the engine's or Lightning's
loop, the strategy's hand-off of logs and outputs, posting receives). The overhead of Lightning is
the difference of that outside time on the bottleneck stage, as a share of the engine's step.
Writes ``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from throughput import (  # noqa: E402
    BATCH, MICROBATCHES, batch_loader, build_model, lightning_module, loss_fn, make_batches, make_optimizer,
)

WARMUP = 5


USAGE = ("minor_faults_per_step", "vol_switches_per_step", "invol_switches_per_step", "main_invol_switches_per_step")


def _usage() -> tuple[int, int, int, int]:
    """Minor page faults and voluntary / involuntary context switches of this process so far, and
    the involuntary switches of the calling (main, training) thread alone."""
    u, t = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD)
    return u.ru_minflt, u.ru_nvcsw, u.ru_nivcsw, t.ru_nivcsw


def _summary(stage: int, step_s: list[float], busy_s: list[float], kinds: dict[str, float], n: int,
             usage: tuple[int, ...] = (0, 0, 0, 0), usage_steps: int = 0) -> dict[str, Any]:  # fmt: skip
    step, busy = statistics.median(step_s), statistics.median(busy_s)
    return {"stage": stage, "step_ms": 1e3 * step, "actions_ms": 1e3 * busy, "outside_ms": 1e3 * (step - busy),
            "per_kind_ms": {k: round(1e3 * v / n, 2) for k, v in kinds.items()},
            **{key: u / (usage_steps or n) for key, u in zip(USAGE, usage)}}  # fmt: skip


def engine_worker(rank: int, world: int, port: int, policy: str, steps: int, out: str) -> None:
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.engine import PipelineEngine
    from lightning_asyncpipe.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    engine = PipelineEngine(build_model(), world, policy, MICROBATCHES, make_optimizer, loss_fn,
                            groups=PipelineGroups(Topology(world, world), rank))  # fmt: skip
    step_s, busy_s, kinds = [], [], {}
    for i, (x, y) in enumerate(make_batches(WARMUP + steps)):
        if i == WARMUP:
            before = _usage()
        start = time.perf_counter()
        engine.train_step(x, y)
        if i >= WARMUP:
            step_s.append(time.perf_counter() - start)
            busy_s.append(sum(t.end - t.start for t in engine.last_timings))
            for t in engine.last_timings:
                kinds[t.action.kind.name] = kinds.get(t.action.kind.name, 0.0) + t.end - t.start
    usage = tuple(a - b for a, b in zip(_usage(), before))
    engine.drain()
    with open(f"{out}.engine.rank{rank}.json", "w") as f:
        json.dump(_summary(engine.stage, step_s, busy_s, kinds, steps, usage), f)
    dist.barrier()
    dist.destroy_process_group()


def lightning_worker(policy: str, steps: int, out: str) -> None:
    import lightning as L

    from lightning_asyncpipe import AsyncPipeStrategy
    from lightning_asyncpipe.trace import TimelineRecorder

    torch.set_num_threads(1)

    class Probe(L.Callback):
        starts: list[float] = []

        def on_train_start(self, trainer: Any, module: Any) -> None:
            s = trainer.strategy
            s.timeline = TimelineRecorder(s.stage, first_step=WARMUP, n_steps=steps - 1)

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if len(self.starts) == WARMUP:
                self.usage = _usage()
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, module: Any) -> None:
            usage = tuple(a - b for a, b in zip(_usage(), self.usage))
            s = trainer.strategy
            busy: dict[int, float] = {}
            kinds: dict[str, float] = {}
            for e in s.timeline.events:
                busy[e.step] = busy.get(e.step, 0.0) + e.end - e.start
                kinds[e.kind] = kinds.get(e.kind, 0.0) + e.end - e.start
            step_s = [self.starts[k + 1] - self.starts[k] for k in sorted(busy)]
            with open(f"{out}.lightning.rank{trainer.global_rank}.json", "w") as f:
                json.dump(_summary(s.stage, step_s, [busy[k] for k in sorted(busy)], kinds, len(busy), usage, steps), f)

    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=WARMUP + steps, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[Probe()],
        strategy=AsyncPipeStrategy(policy=policy, microbatches=MICROBATCHES, pipeline_metrics=False),
    )  # fmt: skip
    trainer.fit(lightning_module(), batch_loader(make_batches(WARMUP + steps)))


def _median_summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of one stage's summaries (action kinds named as in the engine)."""
    names = {"F": "FORWARD", "B": "BACKWARD", "W": "WEIGHT", "U": "UPDATE"}
    kinds: dict[str, list[float]] = {}
    for part in parts:
        for k, v in part["per_kind_ms"].items():
            kinds.setdefault(names.get(k, k), []).append(v)
    return {"stage": parts[0]["stage"], **{k: statistics.median(p[k] for p in parts) for k in
            ("step_ms", "actions_ms", "outside_ms", *USAGE)}, "per_kind_ms": {k: statistics.median(v) for k, v in kinds.items()}}


def _collect(prefix: str) -> list[dict[str, Any]]:
    parts = []
    for rank in range(2):
        with open(f"{prefix}.rank{rank}.json") as f:
            parts.append(json.load(f))
        os.remove(f"{prefix}.rank{rank}.json")
    return sorted(parts, key=lambda p: p["stage"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="pipedream_2bw,pipedream_flush")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="engine/Lightning pairs, alternating which runs first")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="result file name (default overhead, overhead_gpt)")
    p.add_argument("--lightning-worker", default=None)
    p.add_argument("--prefix", default=None)
    a = p.parse_args()
    if a.lightning_worker:
        lightning_worker(a.lightning_worker, a.steps, a.prefix)
        return
    import torch.multiprocessing as mp

    os.makedirs(a.out, exist_ok=True)

    def run_engine(policy: str, prefix: str) -> list[dict[str, Any]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(engine_worker, args=(2, port, policy, a.steps, prefix), nprocs=2, start_method="spawn")
        return _collect(prefix + ".engine")

    def run_lightning(policy: str, prefix: str) -> list[dict[str, Any]]:
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--lightning-worker", policy, "--steps",
                        str(a.steps), "--prefix", prefix], env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        return _collect(prefix + ".lightning")

    runs: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for rnd in range(a.rounds):
        for policy in a.policies.split(","):
            prefix = os.path.join(a.out, f".overhead-{policy}")
            got = runs.setdefault(policy, {"engine": [], "lightning": []})
            # alternate which half runs first, so a drift of the host does not favour one side
            order = [("engine", run_engine), ("lightning", run_lightning)]
            for side, run in order if rnd % 2 == 0 else order[::-1]:
                got[side].append(run(policy, prefix))
            print(f"round {rnd + 1}/{a.rounds} {policy} done", flush=True)
    rows = []
    for policy, got in runs.items():
        for stage in range(2):
            e, lt = (_median_summary([r[stage] for r in got[side]]) for side in ("engine", "lightning"))
            rows.append({"policy": policy, "stage": stage, "engine": e, "lightning": lt,
                         "rounds": {side: [r[stage] for r in got[side]] for side in got}})  # fmt: skip
    model = "character GPT" if os.environ.get("ASYNCPIPE_BENCH_MODEL") == "gpt" else "MLP"
    lines = [
        f"{model} (benchmarks/throughput.py), batch {BATCH}, {MICROBATCHES} micro-batches, 2 stages, one thread per process; "
        f"medians over {a.steps} steps after {WARMUP} warm-up steps, then medians over {a.rounds} rounds (engine and "
        "Lightning once each per round, alternating which runs first).",
        "",
        "| policy | stage | engine step | engine outside actions | Lightning step | Lightning outside actions | "
        "Lightning's extra outside time, share of the engine's step | step time, Lightning vs engine | "
        "update action, Lightning vs engine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, lt = r["engine"], r["lightning"]
        extra = lt["outside_ms"] - e["outside_ms"]
        r["extra_share"] = extra / e["step_ms"]
        lines.append(f"| {r['policy']} | {r['stage']} | {e['step_ms']:.1f} ms | {e['outside_ms']:.1f} ms | "
                     f"{lt['step_ms']:.1f} ms | {lt['outside_ms']:.1f} ms | {extra:+.1f} ms ({100 * r['extra_share']:+.1f} %) | "
                     f"{100 * (lt['step_ms'] / e['step_ms'] - 1):+.1f} % | "
                     f"{100 * (lt['per_kind_ms']['UPDATE'] / e['per_kind_ms']['UPDATE'] - 1):+.1f} % |")  # fmt: skip
    lines += ["", "Per step, medians over rounds: minor page faults and involuntary context switches "
              "(getrusage over the timed steps).", "",
              "| policy | stage | page faults, engine / Lightning | involuntary switches, engine / Lightning | "
              "of the training thread, engine / Lightning |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        e, lt = r["engine"], r["lightning"]
        lines.append(f"| {r['policy']} | {r['stage']} | {e['minor_faults_per_step']:.0f} / "
                     f"{lt['minor_faults_per_step']:.0f} | {e['invol_switches_per_step']:.1f} / "
                     f"{lt['invol_switches_per_step']:.1f} | {e['main_invol_switches_per_step']:.1f} / "
                     f"{lt['main_invol_switches_per_step']:.1f} |")  # fmt: skip
    name = a.name or ("overhead_gpt" if model != "MLP" else "overhead")
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
