"""What the policies do at 8, 16 or 64 stages: the schedule simulator fed with per-action costs.

    python benchmarks/scale.py --validate     # measured CPU runs (p = 2, 3, 4) against the prediction
    python benchmarks/scale.py                # GPU-like costs, p = 2..64, m = 1..64: table + plots

The prediction runs each policy's own actions (``WeightPolicy.step_actions`` / ``drain_actions``,
the lists the engine executes) for ``STEPS`` steps through :func:`lightning_asyncpipe.schedule.simulate`
with a duration per action kind and stage and a link time per message (latency + bytes /
bandwidth). Throughput is the steady state: the time between stage 0's updates of batches 2 and
``STEPS - 2``. Bubble: each stage's idle share of that window. Memory per stage: the policy's
weight copies (its definition: docs/concepts.md) times the stage's weights, plus the peak number
of micro-batches in flight (from the simulation) times one micro-batch's activations.

Costs as this project's engine runs them: the backward of a micro-batch computes input
gradients only; ``nn.Linear`` weight gradients are computed once per batch at the update
(``lightning_asyncpipe/wgrad.py``), so an update costs ``m x W + optimizer``.

**Validation** (``--validate``): the main job (examples/train.py, the character GPT, 4 blocks,
n_embd 128, batch 32, 4 micro-batches) runs on ``p`` CPU processes with a recorded timeline; the
mean compute time of each action kind per stage (the timeline's duration minus its transfer wait)
and the mean transfer wait of the first stage's forwards feed the simulator, whose steady-state
step time is compared with the measured one (the timeline's steps). Writes
``benchmarks/results/scale_validation.{json,md}``.

**GPU-like costs** (the default): GPT-3 175B's layers (Brown et al. 2020: 96 layers, hidden
12288, sequence 2048), micro-batch 1, bf16. A layer's forward is ``24 b s h^2 (1 + s / 6h)``
FLOPs (Narayanan et al., SC'21, "Efficient large-scale language model training on GPU clusters
using Megatron-LM", eq. 3's per-layer term); at 400 TFLOP/s achieved (about 40 % of an H100 SXM's
989 dense bf16 TFLOP/s, NVIDIA H100 datasheet) that is 19 ms. Input gradient = forward, weight
gradient = forward (the backward's 2x split evenly). Activations crossing a stage boundary:
``b s h`` bf16 values, 50 MB; inside a node NVLink 4 (450 GB/s per direction, H100 datasheet),
between nodes (8 GPUs each) NDR InfiniBand (400 Gb/s = 50 GB/s per GPU); latency 10 us.
Activation memory per layer and micro-batch ``s b h (34 + 5 a s / h)`` bytes (Korthikanti et al.
2022, "Reducing activation recomputation in large transformer models", no recomputation), 96
heads. The 96 layers are split evenly (fractional layers per stage at p = 64). Writes
``benchmarks/results/scale_gpu.{json,md}`` and ``docs/images/scale_gpu.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

from lightning_asyncpipe.policies import available_policies, policy_class  # noqa: E402
from lightning_asyncpipe.schedule import ActionKind, simulate  # noqa: E402

RESULTS = os.path.join(HERE, "results")
STEPS = 8
POLICIES = ["gpipe", "pipedream_flush", "zero_bubble", "pipedream", "pipedream_2bw", "pipemare"]
# weight copies per stage, by definition (docs/concepts.md): PipeDream stashes one per version in flight
COPIES = {"gpipe": lambda p, s, m: 1, "pipedream_flush": lambda p, s, m: 1, "zero_bubble": lambda p, s, m: 1,
          "pipedream": lambda p, s, m: 1 + -(-(p - 1 - s) // m), "pipedream_2bw": lambda p, s, m: 2,
          "pipemare": lambda p, s, m: 2}  # fmt: skip  (PipeMare: weights + velocity)


def schedule_of(policy: str, p: int, m: int, steps: int = STEPS) -> dict[int, list[Any]]:
    """The actions every stage runs over ``steps`` training steps and the final drain."""
    cls = policy_class(policy)
    pol = cls()
    out: dict[int, list[Any]] = {}
    for s in range(p):
        actions = []
        for k in range(steps):
            actions += pol.step_actions(p, m, s, k, 0)
        actions += pol.drain_actions(p, m, s, steps - 1, 0)
        out[s] = actions
    return out


def predict(policy: str, p: int, m: int, forward: Mapping[int, float], backward: Mapping[int, float],
            update: Mapping[int, float], transfer: float, weight: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Steady-state step time, bubble per stage and peak micro-batches in flight per stage."""
    result = simulate(schedule_of(policy, p, m), forward, backward, update, weight_time=weight or 0.0,
                      transfer_time=transfer)  # fmt: skip
    ends = {a.index: e for _, e, a in result.timeline[0] if a.kind is ActionKind.UPDATE}
    k1, k2 = 2, STEPS - 2
    window = (ends[k1], ends[k2])
    step = (window[1] - window[0]) / (k2 - k1)
    bubble = {}
    for s, events in result.timeline.items():
        busy = sum(max(0.0, min(e, window[1]) - max(b, window[0])) for b, e, _ in events)
        bubble[s] = 1.0 - busy / (window[1] - window[0])
    return {"step_s": step, "bubble": bubble, "peak_in_flight": result.peak_in_flight}


# ---------------------------------------------------------------------------- validation


def measure(policy: str, p: int, out: str) -> dict[str, Any]:
    """Run the main job on ``p`` CPU processes with a timeline of steps 6..13; per-stage action costs."""
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train.py"), f"strategy={policy}", f"trainer.devices={p}",
           "trainer.max_steps=16", "trainer.limit_val_batches=0", "trainer.val_check_interval=1000",
           "timeline.first_step=6", "timeline.steps=8", f"hydra.run.dir={out}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    with open(os.path.join(out, "timeline", "timeline.json")) as f:
        trace = json.load(f)["traceEvents"]
    events = [e for e in trace if e.get("ph") == "X"]
    cost: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    waits: list[float] = []
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        rows[e["tid"]].append(e)
        if e["cat"] == "F" and e["tid"] > 0:
            waits.append(e["args"]["transfer_wait_us"] * 1e-6)
    for stage, row in rows.items():
        row.sort(key=lambda e: e["ts"])
        # an action's cost: from its start to the next action's start, less its transfer wait (the
        # engine's own time between actions, and the Lightning loop between steps, is the stage's work)
        for e, nxt in zip(row, row[1:] + [None]):
            end = nxt["ts"] if nxt is not None and nxt["args"]["step"] - e["args"]["step"] <= 1 else e["ts"] + e["dur"]
            cost[e["cat"]][stage].append((end - e["ts"] - e["args"]["transfer_wait_us"]) * 1e-6)
    by_step: dict[int, list[float]] = defaultdict(list)
    for e in events:
        by_step[e["args"]["step"]] += [e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6]
    steps = sorted(by_step)
    starts = [min(by_step[k]) for k in steps]
    measured = statistics.median(b - a for a, b in zip(starts, starts[1:]))
    mean = {kind: {s: statistics.mean(v) for s, v in per.items()} for kind, per in cost.items()}
    return {"measured_step_s": measured, "costs": mean, "transfer_wait_s": min(waits) if waits else 0.0}


def validate(policies: list[str], stages: list[int], m: int) -> None:
    rows = []
    for p in stages:
        for policy in policies:
            with tempfile.TemporaryDirectory() as out:
                got = measure(policy, p, out)
            c = got["costs"]
            pred = predict(policy, p, m, c["F"], c["B"], c.get("U", {s: 0.0 for s in range(p)}), got["transfer_wait_s"],
                           c.get("W"))  # fmt: skip
            err = pred["step_s"] / got["measured_step_s"] - 1
            rows.append({"policy": policy, "stages": p, "measured_ms": 1e3 * got["measured_step_s"],
                         "predicted_ms": 1e3 * pred["step_s"], "error": err, "costs": c})  # fmt: skip
            print(f"p={p} {policy:16s} measured {1e3 * got['measured_step_s']:7.1f} ms  predicted "
                  f"{1e3 * pred['step_s']:7.1f} ms  ({100 * err:+.1f} %)", flush=True)  # fmt: skip
    lines = [f"Main job (character GPT, 4 blocks, n_embd 128, batch 32, {m} micro-batches), one thread per process, "
             f"{os.cpu_count()} CPUs; steady-state step time from the timeline of steps 6-13.", "",
             "| policy | stages | measured ms/step | predicted ms/step | error |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['policy']} | {r['stages']} | {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {100 * r['error']:+.1f} % |"
              for r in rows]  # fmt: skip
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "scale_validation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(RESULTS, "scale_validation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------- GPU-like costs

LAYERS, HIDDEN, SEQ, HEADS, MICRO = 96, 12288, 2048, 96, 1
TFLOPS = 400e12
NVLINK, INFINIBAND, LATENCY, GPUS_PER_NODE = 450e9, 50e9, 10e-6, 8


def gpu_costs(p: int, m: int) -> dict[str, Any]:
    layer_f = 24 * MICRO * SEQ * HIDDEN**2 * (1 + SEQ / (6 * HIDDEN)) / TFLOPS
    per_stage = LAYERS / p
    f = per_stage * layer_f
    bytes_ = MICRO * SEQ * HIDDEN * 2
    link = NVLINK if p <= GPUS_PER_NODE else INFINIBAND  # more than a node: some boundaries cross IB
    act = per_stage * SEQ * MICRO * HIDDEN * (34 + 5 * HEADS * SEQ / HIDDEN)
    weights = per_stage * 12 * HIDDEN**2 * 2  # bf16 weights of a layer: 12 h^2 parameters
    return {"F": f, "Bi": f, "W": f, "transfer": LATENCY + bytes_ / link, "act_bytes": act, "weight_bytes": weights}


def scale(policies: list[str], stages: list[int], microbatches: list[int]) -> None:
    rows = []
    for p in stages:
        for m in microbatches:
            c = gpu_costs(p, m)
            for policy in policies:
                cls = policy_class(policy)
                try:
                    cls().validate(p, m)
                except Exception:
                    continue  # e.g. 2BW needs m >= p
                uniform = {s: c["F"] for s in range(p)}
                # weight gradients: W actions where the schedule has them (zero_bubble), else in the
                # update, once per batch (the engine's deferred weight gradients)
                split = any(a.kind is ActionKind.WEIGHT for a in schedule_of(policy, p, m, 1)[0])
                pred = predict(policy, p, m, uniform, {s: c["Bi"] for s in range(p)},
                               {s: 0.0 if split else m * c["W"] for s in range(p)}, c["transfer"],
                               {s: c["W"] for s in range(p)} if split else None)  # fmt: skip
                ideal = m * (c["F"] + c["Bi"] + c["W"])  # a step's work on one stage, no bubble
                memory = max(COPIES[policy](p, s, m) * c["weight_bytes"] + pred["peak_in_flight"][s] * c["act_bytes"]
                             for s in range(p))  # fmt: skip
                rows.append({"policy": policy, "stages": p, "microbatches": m, "step_s": pred["step_s"],
                             "efficiency": ideal / pred["step_s"], "max_bubble": max(pred["bubble"].values()),
                             "peak_memory_gib": memory / 2**30})  # fmt: skip
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "scale_gpu.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = ["| stages | micro-batches | " + " | ".join(policies) + " |", "|---:|---:|" + "---:|" * len(policies)]
    for p in stages:
        for m in (mm for mm in microbatches if mm in (1, p, 4 * p) or (mm == 64 and p >= 16)):
            cells = []
            for policy in policies:
                r = next((r for r in rows if r["policy"] == policy and r["stages"] == p and r["microbatches"] == m), None)
                cells.append("-" if r is None else f"{r['efficiency']:.2f} / {r['peak_memory_gib']:.0f}")
            table.append(f"| {p} | {m} | " + " | ".join(cells) + " |")
    text = ("Pipeline efficiency (a step's work over the predicted step time: 1.00 = no bubble) / peak memory "
            "per stage in GiB (weights x copies + activations in flight), GPT-3 175B layers on H100-like costs "
            "(see benchmarks/scale.py for every number's source).\n\n" + "\n".join(table) + "\n")
    with open(os.path.join(RESULTS, "scale_gpu.md"), "w") as f:
        f.write(text)
    print(text)
    plot(rows, policies, stages, microbatches)


def plot(rows: list[dict[str, Any]], policies: list[str], stages: list[int], microbatches: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for policy in policies:
        for ax, m_of in ((axes[0], lambda p: min(4 * p, 64)), (axes[1], lambda p: 8)):
            xs = [p for p in stages if any(r["policy"] == policy and r["stages"] == p and r["microbatches"] == m_of(p) for r in rows)]
            ys = [next(r["efficiency"] for r in rows if r["policy"] == policy and r["stages"] == p and r["microbatches"] == m_of(p)) for p in xs]
            ax.plot(xs, ys, marker="o", label=policy)
        p = 16
        xs = [m for m in microbatches if any(r["policy"] == policy and r["stages"] == p and r["microbatches"] == m for r in rows)]
        ys = [next(r["efficiency"] for r in rows if r["policy"] == policy and r["stages"] == p and r["microbatches"] == m) for m in xs]
        axes[2].plot(xs, ys, marker="o", label=policy)
    axes[0].set(title="m = 4p micro-batches (m <= 64)", xlabel="stages p", ylabel="pipeline efficiency")
    axes[1].set(title="m = 8 micro-batches", xlabel="stages p")
    axes[2].set(title="p = 16 stages", xlabel="micro-batches m")
    from matplotlib.ticker import ScalarFormatter

    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle("Simulated pipeline efficiency, GPT-3 175B layers on H100-like costs (benchmarks/scale.py)")
    fig.tight_layout()
    path = os.path.join(ROOT, "docs", "images", "scale_gpu.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--validate", action="store_true", help="measured CPU runs against the prediction")
    ap.add_argument("--stages", default=None, help="comma-separated stage counts")
    ap.add_argument("--policies", default=None, help="comma-separated policies")
    a = ap.parse_args()
    policies = [q for q in (a.policies.split(",") if a.policies else POLICIES) if q in available_policies()]
    if a.validate:
        validate(policies, [int(x) for x in (a.stages or "2,3,4").split(",")], m=4)
    else:
        stages = [int(x) for x in (a.stages or "2,4,8,16,32,64").split(",")]
        scale(policies, stages, [1, 2, 4, 8, 16, 32, 64])


if __name__ == "__main__":
    main()
