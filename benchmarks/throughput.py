"""Training throughput of every contender on the same model, data and machine, in one command.

    python benchmarks/throughput.py            # full run: 5 warm-up + 20 timed steps, 5 rounds
    python benchmarks/throughput.py --quick    # a smoke run: 2 + 5 steps, 1 round
    python benchmarks/throughput.py --stages 4 # contention check (4 processes)
    python benchmarks/throughput.py --model gpt  # the main job's character GPT (batch 32, 4 micro-batches)
    python benchmarks/throughput.py --microbatches 4  # another number of micro-batches (same batch)
    python benchmarks/throughput.py --pin      # every one-thread process on its own core, all contenders alike
    python benchmarks/throughput.py --model gpt --render benchmarks/results/throughput_gpt.json  # table only

Writes ``benchmarks/results/throughput[_gpt][_<N>stages][_m<M>][_pinned].{json,md}``.

Contenders (one process per stage, ``torch.set_num_threads(1)`` and ``OMP_NUM_THREADS=1`` in each):

- ``single/1thread``: a plain PyTorch loop over the full model, one process, one thread.
- ``single/all-threads``: the same with ``torch.set_num_threads(os.cpu_count())``.
- ``torch.pp/<schedule>``: ``torch.distributed.pipelining`` with a manual split (the same layers per
  stage as this project's uniform split), ``optimizer.step()`` after each ``schedule.step``: GPipe,
  1F1B, and with two stages per rank (the model split in ``2p``) Interleaved1F1B,
  InterleavedZeroBubble (rank ``r`` holds stages ``r, r+p``), ZBVZeroBubble and DualPipeV (``r,
  2p-1-r``). "vs best (c)" is against the best of them, "vs best zero-bubble" against the best of
  the last three.
- ``floor/pipeline-m<M>`` (MLP only): ``benchmarks/floor.py``'s bare stage kernels side by side,
  no engine, autograd or transfers: the limit for any pipeline of this work here ("vs floor").
- ``engine/<policy>``: this project's raw :class:`~lightning_asyncpipe.engine.PipelineEngine`.
- ``lightning/<policy>``: Lightning's Trainer with :class:`~lightning_asyncpipe.AsyncPipeStrategy`
  (popen launcher: ``python benchmarks/throughput.py --lightning-worker POLICY ...`` re-runs itself).
- ``ceiling/<policy>``: the raw engine with the transfers taken out (:func:`run_ceiling`): every
  stage does its own work of a step alone, all processes at once; the best this work can reach here.

Timing: a launch builds a fresh model (same seed), runs ``warmup`` steps, then a barrier over all
ranks, ``t0``, ``steps`` steps (the engine drains at the end so in-flight work is counted), a
barrier, ``t1``; throughput is ``steps * batch / (t1 - t0)`` with the largest ``t1 - t0`` over the
ranks. The run goes in rounds (``--repeats``): each round launches every contender once, in table
order, so the host's slow periods fall on all contenders alike. The median over rounds is
reported. Peak RSS is ``ru_maxrss`` at the end of each process (the largest process, largest
round); stashed bytes are the policy's ``peak_stashed_bytes`` (largest stage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
POLICIES = ["gpipe", "pipedream_flush", "zero_bubble", "pipedream", "pipedream_2bw", "pipemare"]
ASYNC_POLICIES = ["pipedream", "pipedream_2bw", "pipemare"]
WIDTH, LAYERS, BATCH, MICROBATCHES, LR, MOMENTUM = 1024, 8, 256, 8, 1e-3, 0.9
MODEL = os.environ.get("ASYNCPIPE_BENCH_MODEL", "mlp")  # set by --model; inherited by every worker
GPT_CONTEXT = 64
if MODEL == "gpt":  # the main job's character GPT (examples/chargpt.py) with its batch and micro-batches
    BATCH, MICROBATCHES = 32, 4
MICROBATCHES = int(os.environ.get("ASYNCPIPE_BENCH_MICROBATCHES", MICROBATCHES))  # set by --microbatches
LAUNCH_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- model and data


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    if MODEL == "gpt":
        sys.path.insert(0, HERE)
        from gpt_sequential import sequential_gpt
        from chargpt import CharGPT

        return sequential_gpt(CharGPT(n_layer=4, n_embd=128, block_size=GPT_CONTEXT).model)
    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if i < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if MODEL == "gpt":
        return F.cross_entropy(output.flatten(0, 1), target.flatten())
    return F.mse_loss(output, target)


def make_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if MODEL == "gpt":
        tokens = [torch.randint(0, 256, (BATCH, GPT_CONTEXT + 1), generator=g) for _ in range(n)]
        return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    return [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)) for _ in range(n)]


def lightning_module() -> Any:
    """The benchmark model, loss and optimizer as a LightningModule (``self.net``; the loss in
    ``training_step``). Lightning is imported here, so the raw-engine workers never load it."""
    import lightning as L

    class BenchModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters())

    return BenchModule()


def batch_loader(batches: list) -> Any:
    """A DataLoader of pre-generated whole batches: no per-sample collation in the timed loop."""
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset):
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, i: int) -> Any:
            return batches[i]

    return DataLoader(Batches(), batch_size=None, shuffle=False)


def uniform_counts(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage: the same split as lightning_asyncpipe's ``balance="uniform"``."""
    return [n_layers // n_stages + (1 if s < n_layers % n_stages else 0) for s in range(n_stages)]


def peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_collect(target: Any, n_procs: int, args: tuple, n_results: int, timeout: float) -> list[Any]:
    """Run ``target(rank, port, *args, queue)`` in ``n_procs`` spawned processes (``port`` a free
    one for the process group) and return the ``n_results`` items they put on ``queue``; a process
    that exits with an error ends the run."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(n_procs)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=timeout) for _ in range(n_results)]
    for proc in procs:
        proc.join(timeout=60)
        if proc.exitcode != 0:
            raise SystemExit(f"a worker exited with {proc.exitcode}")
    return results


def pin_to_core(rank: int, threads: int = 1) -> None:
    """With ``--pin`` (``ASYNCPIPE_BENCH_PIN=1``, inherited by every worker): run the one-thread
    process of ``rank`` on core ``rank % cpus`` only, so two stages never share a core."""
    if os.environ.get("ASYNCPIPE_BENCH_PIN") == "1" and threads == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {rank % (os.cpu_count() or 1)})


def write_rank_result(prefix: str, rank: int, result: dict[str, Any]) -> None:
    result["rss_kib"] = peak_rss_kib()
    result["rank"] = rank
    result["cores"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------- spawned workers


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _timed(step: Any, batches: list, warmup: int, steps: int, finish: Any = None) -> float:
    for i in range(warmup):
        step(*batches[i])
    _barrier()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(*batches[i])
    if finish is not None:
        finish()
    _barrier()
    return time.perf_counter() - t0


def run_single(cfg: dict[str, Any]) -> dict[str, Any]:
    batches = make_batches(cfg["warmup"] + cfg["steps"])
    times = []
    for _ in range(cfg["repeats"]):
        model = build_model()
        opt = make_optimizer(model.parameters())

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        times.append(_timed(step, batches, cfg["warmup"], cfg["steps"]))
    return {"times": times}


# torch.distributed.pipelining's schedules: one stage per rank, or two per rank ("loop": rank r holds
# stages r and r + p, "v": stages r and 2p - 1 - r, as the V-shaped schedules require)
TORCH_PP_SCHEDULES = {
    "GPipe": ("ScheduleGPipe", None),
    "1F1B": ("Schedule1F1B", None),
    "Interleaved1F1B": ("ScheduleInterleaved1F1B", "loop"),
    "InterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", "loop"),
    "ZBVZeroBubble": ("ScheduleZBVZeroBubble", "v"),
    "DualPipeV": ("ScheduleDualPipeV", "v"),
}
TORCH_PP_ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def run_torch_pp(rank: int, n_stages: int, cfg: dict[str, Any], schedule_name: str) -> dict[str, Any]:
    import torch.distributed.pipelining as pp

    class_name, placement = TORCH_PP_SCHEDULES[schedule_name]
    schedule_cls = getattr(pp, class_name)
    total = n_stages if placement is None else 2 * n_stages
    indices = [rank] if placement is None else [rank, rank + n_stages] if placement == "loop" else [rank, total - 1 - rank]
    batches = make_batches(cfg["warmup"] + cfg["steps"])
    times = []
    for _ in range(cfg["repeats"]):
        full = build_model()
        counts = uniform_counts(len(full), total)
        subs = [nn.Sequential(*list(full)[sum(counts[:i]):sum(counts[:i + 1])]) for i in indices]
        del full
        stages = [pp.PipelineStage(sub, i, total, torch.device("cpu")) for sub, i in zip(subs, indices)]
        schedule = schedule_cls(stages[0] if placement is None else stages, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
        opt = make_optimizer([q for sub in subs for q in sub.parameters()])
        first, last = 0 in indices, total - 1 in indices

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            schedule.step(*((x,) if first else ()), **(dict(target=y, losses=[]) if last else {}))
            opt.step()

        times.append(_timed(step, batches, cfg["warmup"], cfg["steps"]))
    return {"times": times}


def run_engine(rank: int, n_stages: int, cfg: dict[str, Any], policy: str) -> dict[str, Any]:
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.engine import PipelineEngine
    from lightning_asyncpipe.topology import Topology

    groups = PipelineGroups(Topology(n_stages, n_stages), rank)
    batches = make_batches(cfg["warmup"] + cfg["steps"])
    times, stashed = [], 0
    for _ in range(cfg["repeats"]):
        engine = PipelineEngine(build_model(), n_stages, policy, MICROBATCHES, make_optimizer, loss_fn,
                                groups=groups)  # fmt: skip
        times.append(_timed(engine.train_step, batches, cfg["warmup"], cfg["steps"], finish=engine.drain))
        stashed = max(stashed, int(engine.policy.report().peak_stashed_bytes))
    return {"times": times, "stage": engine.stage, "peak_stashed_bytes": stashed}


class _Ready:
    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def wait(self) -> tuple[torch.Tensor, ...]:
        return self.tensors


class _Recorded:
    def __init__(self, pending: Any, keep: Any) -> None:
        self.pending, self.keep = pending, keep

    def wait(self) -> tuple[torch.Tensor, ...]:
        tensors = self.pending.wait()
        self.keep(tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors))
        return tensors


class RecordingTransport:
    """Passes everything to the real transport and keeps one received example of each message."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.activations: dict[Any, tuple[torch.Tensor, ...]] = {}
        self.grads: dict[Any, tuple[torch.Tensor, ...]] = {}

    def send_activation(self, tensors: Any, key: Any, requires_grad: Any = None) -> None:
        self.inner.send_activation(tensors, key, requires_grad)

    def recv_activation(self, key: Any) -> Any:
        return _Recorded(self.inner.recv_activation(key), lambda t: self.activations.__setitem__(key, t))

    def send_grad(self, tensors: Any) -> None:
        self.inner.send_grad(tensors)

    def recv_grad(self, metas: Any) -> Any:
        return _Recorded(self.inner.recv_grad(metas), lambda t: self.grads.__setitem__(tuple(metas), t))

    def wait_sends(self) -> None:
        self.inner.wait_sends()

    @property
    def wait_seconds(self) -> float:
        return float(self.inner.wait_seconds)


class ReplayTransport:
    """No transfers: every receive returns a fresh copy of a recorded message at once (the ceiling)."""

    def __init__(self, recorded: RecordingTransport) -> None:
        self.recorded = recorded

    @staticmethod
    def _copy(tensors: tuple[torch.Tensor, ...]) -> _Ready:
        return _Ready(tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors))

    def send_activation(self, tensors: Any, key: Any, requires_grad: Any = None) -> None:
        pass

    def recv_activation(self, key: Any) -> Any:
        return self._copy(self.recorded.activations[key])

    def send_grad(self, tensors: Any) -> None:
        pass

    def recv_grad(self, metas: Any) -> Any:
        return self._copy(self.recorded.grads[tuple(metas)])

    def wait_sends(self) -> None:
        pass

    @property
    def wait_seconds(self) -> float:
        return 0.0


def run_ceiling(rank: int, n_stages: int, cfg: dict[str, Any], policy: str) -> dict[str, Any]:
    """The raw engine with the transfers taken out: each stage computes alone (all processes at once).

    The warm-up runs with real transfers and records one message of each kind; after a drain the
    transport is replaced by one that returns copies of them at once, so every stage does exactly
    its own work of a pipelined step (same layers, micro-batches, policy, weight gradients and
    optimizer) and never waits: the step time of the slowest stage is the best any schedule of
    this work could reach on this machine, transfers and dependencies aside.
    """
    from lightning_asyncpipe.comm import PipelineGroups
    from lightning_asyncpipe.engine import PipelineEngine
    from lightning_asyncpipe.topology import Topology

    groups = PipelineGroups(Topology(n_stages, n_stages), rank)
    batches = make_batches(cfg["warmup"] + cfg["steps"])
    times = []
    for _ in range(cfg["repeats"]):
        engine = PipelineEngine(build_model(), n_stages, policy, MICROBATCHES, make_optimizer, loss_fn,
                                groups=groups)  # fmt: skip
        replay_transfers(engine, batches[: cfg["warmup"]])
        times.append(_timed(engine.train_step, batches, cfg["warmup"], cfg["steps"], finish=engine.drain))
    return {"times": times, "stage": engine.stage}


def replay_transfers(engine: Any, warmup_batches: list) -> None:
    """Warm ``engine`` up on ``warmup_batches`` with real transfers, recording one message of each
    kind, drain, and replace its transport by one that hands out copies of them at once (every
    rank calls it together: it ends with a barrier)."""
    recording = RecordingTransport(engine.executor.transport)
    engine.executor.transport = recording
    for x, y in warmup_batches:
        engine.train_step(x, y)
    engine.drain()
    _barrier()
    engine.executor.transport = ReplayTransport(recording)


def spawn_worker(rank: int, kind: str, arg: str, world: int, port: int, cfg: dict[str, Any], prefix: str) -> None:
    pin_to_core(rank, int(arg) if kind == "single" else 1)
    if kind == "single":
        torch.set_num_threads(int(arg))
        write_rank_result(prefix, rank, {**run_single(cfg), "threads": torch.get_num_threads()})
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if kind == "torch_pp":
            result = run_torch_pp(rank, world, cfg, arg)
        elif kind == "ceiling":
            result = run_ceiling(rank, world, cfg, arg)
        else:
            result = run_engine(rank, world, cfg, arg)
        write_rank_result(prefix, rank, result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- Lightning worker


def lightning_worker(argv: list[str]) -> None:
    """Entry point of ``--lightning-worker``: run by us for rank 0 and by Lightning for the others."""
    p = argparse.ArgumentParser()
    p.add_argument("--lightning-worker", required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--prefix", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pin_to_core(int(os.environ.get("LOCAL_RANK", "0")))  # rank 0 is this process; Lightning starts the others

    import lightning as L

    from lightning_asyncpipe import AsyncPipeStrategy

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.t0 = self.elapsed = None

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == a.warmup:
                _barrier()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            # the last step ends the fit: the strategy has drained the pipeline inside training_step
            if batch_idx == a.warmup + a.steps - 1:
                _barrier()
                self.elapsed = time.perf_counter() - self.t0

    batches = make_batches(a.warmup + a.steps)
    times, stashed, rank, stage = [], 0, 0, None
    for _ in range(a.repeats):
        timer = Timer()
        strategy = AsyncPipeStrategy(policy=a.lightning_worker, microbatches=MICROBATCHES, pipeline_metrics=False)
        trainer = L.Trainer(accelerator="cpu", devices=a.stages, strategy=strategy, max_steps=a.warmup + a.steps,
                            max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[timer])  # fmt: skip
        trainer.fit(lightning_module(), batch_loader(batches))
        times.append(timer.elapsed)
        stashed = max(stashed, int(strategy._policy.report().peak_stashed_bytes))
        rank, stage = trainer.global_rank, strategy.stage
    write_rank_result(a.prefix, rank, {"times": times, "stage": stage, "peak_stashed_bytes": stashed})
    _barrier()


# ---------------------------------------------------------------------------- launching


def collect(prefix: str, world: int) -> dict[str, Any]:
    parts = []
    for r in range(world):
        with open(f"{prefix}.rank{r}.json") as f:
            parts.append(json.load(f))
        os.remove(f"{prefix}.rank{r}.json")
    repeats = len(parts[0]["times"])
    elapsed = [max(p["times"][i] for p in parts) for i in range(repeats)]
    return {
        "elapsed_s": elapsed,
        "rss_mib": [round(p["rss_kib"] / 1024, 1) for p in parts],
        "peak_stashed_bytes": [p.get("peak_stashed_bytes") for p in parts],
        "cores": [p.get("cores") for p in parts],  # the cores each rank was allowed to run on
    }


def launch_spawn(kind: str, arg: str, world: int, cfg: dict[str, Any], prefix: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(spawn_worker, args=(kind, arg, world, free_port(), cfg, prefix), nprocs=world,
                             start_method="spawn", join=False)  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{kind} {arg} did not finish in {LAUNCH_TIMEOUT_S} s")
    return collect(prefix, world)


def launch_lightning(policy: str, world: int, cfg: dict[str, Any], prefix: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--lightning-worker", policy, "--stages", str(world),
           "--warmup", str(cfg["warmup"]), "--steps", str(cfg["steps"]), "--repeats", str(cfg["repeats"]),
           "--prefix", prefix]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK"):
        env.pop(name, None)
    log_path = prefix + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            raise TimeoutError(f"lightning {policy} did not finish in {LAUNCH_TIMEOUT_S} s")
    if rc != 0:
        with open(log_path) as f:
            raise RuntimeError(f"lightning worker exited with {rc}:\n{f.read()[-3000:]}")
    # the other ranks are Lightning's children; rank 0 left after a barrier, so their files exist
    result = collect(prefix, world)
    os.remove(log_path)
    return result


def contenders(stages: int) -> list[dict[str, Any]]:
    threads = os.cpu_count() or 1
    out = [
        {"name": "single/1thread", "group": "a", "launch": ("spawn", "single", "1", 1), "procs": "1 x 1 thread"},
        {"name": f"single/{threads}threads", "group": "b", "launch": ("spawn", "single", str(threads), 1),
         "procs": f"1 x {threads} threads"},
    ]
    for sched, (_, placement) in TORCH_PP_SCHEDULES.items():
        out.append({"name": f"torch.pp/{sched}", "group": "c", "launch": ("spawn", "torch_pp", sched, stages),
                    "procs": f"{stages} x 1 thread" + ("" if placement is None else ", 2 stages each")})
    for policy in POLICIES:
        out.append({"name": f"engine/{policy}", "group": "d-raw", "launch": ("spawn", "engine", policy, stages),
                    "procs": f"{stages} x 1 thread"})
    for policy in POLICIES:
        out.append({"name": f"lightning/{policy}", "group": "d-lightning", "launch": ("lightning", "", policy, stages),
                    "procs": f"{stages} x 1 thread"})
    for policy in ASYNC_POLICIES:
        out.append({"name": f"ceiling/{policy}", "group": "e", "launch": ("spawn", "ceiling", policy, stages),
                    "procs": f"{stages} x 1 thread"})
    if MODEL == "mlp":  # benchmarks/floor.py models the MLP's kernels only
        out.append({"name": f"floor/pipeline-m{MICROBATCHES}", "group": "f", "launch": ("floor", "pipeline", "", stages),
                    "procs": f"{stages} x 1 thread"})
    return out


def launch_floor(world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """benchmarks/floor.py's bare stage kernels side by side (no engine, autograd or transfers)."""
    sys.path.insert(0, HERE)
    import floor

    per_s = floor.launch("pipeline", world, MICROBATCHES, cfg["warmup"], cfg["steps"], {"OMP_NUM_THREADS": "1"})
    return {"elapsed_s": [cfg["steps"] * BATCH / per_s], "rss_mib": [0.0], "peak_stashed_bytes": [], "cores": None}


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: list[dict[str, Any]], cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    model = (f"character GPT (examples/chargpt.py: 4 blocks, n_embd 128, context {GPT_CONTEXT}), cross-entropy"
             if MODEL == "gpt" else f"MLP, {LAYERS} x Linear({WIDTH}, {WIDTH}) with ReLU, MSE")
    lines = [
        f"Model: {model}, SGD lr {LR} momentum {MOMENTUM}; batch {BATCH} ({'sequences' if MODEL == 'gpt' else 'samples'}), "
        f"{MICROBATCHES} micro-batches, {cfg['stages']} stages. {cfg['warmup']} warm-up + {cfg['steps']} timed steps, "
        f"median of {cfg['repeats']} round(s), every contender once per round in table order. {meta['cpus']} CPUs, torch {meta['torch']}, gloo."
        + (" Every one-thread process pinned to its own core (`--pin`)." if meta.get("pinned") else ""),
        "",
        "| contender | group | processes | samples/s (median) | min-max | vs (a) | vs best (c) | vs best zero-bubble (c) | vs floor (f) | vs ceiling (e) | peak RSS MiB (max process) | stashed weights MiB (max stage) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['group']} | {r['procs']} | failed | | | | | | | | |")
            continue
        stashed = r.get("stashed_mib")
        lines.append(
            f"| {r['name']} | {r['group']} | {r['procs']} | {r['samples_per_s']:.1f} | "
            f"{min(r['samples_per_s_runs']):.1f}-{max(r['samples_per_s_runs']):.1f} | {fmt(r.get('vs_a'), '.2f')}x | "
            f"{fmt(r.get('vs_best_c'), '.2f')}x | {fmt(r.get('vs_best_zb'), '.2f')}{'x' if r.get('vs_best_zb') else ''} | "
            f"{fmt(r.get('vs_floor'), '.2f')}{'x' if r.get('vs_floor') else ''} | "
            f"{fmt(r.get('vs_ceiling'), '.2f')}{'x' if r.get('vs_ceiling') else ''} | "
            f"{fmt(max(r['rss_mib']) or None, '.0f')} | {fmt(stashed, '.1f')} |"
        )
    lines += paired_lines(results, "lightning", "engine", "Lightning against the raw engine")
    lines += paired_lines(results, "engine", "ceiling", "the raw engine against its ceiling")
    return "\n".join(lines) + "\n"


def paired_lines(results: list[dict[str, Any]], a: str, b: str, title: str) -> list[str]:
    """Per-round ratios ``a/<policy>`` over ``b/<policy>``: both ran in the same round, minutes
    apart, so the host's drift between rounds cancels out of each ratio."""
    runs = {r["name"]: r["samples_per_s_runs"] for r in results if "samples_per_s_runs" in r}
    rows = []
    for policy in POLICIES:
        x, y = runs.get(f"{a}/{policy}"), runs.get(f"{b}/{policy}")
        if x and y and len(x) == len(y):
            ratios = [u / v for u, v in zip(x, y)]
            rows.append(f"| {policy} | {', '.join(f'{q:.2f}' for q in ratios)} | {statistics.median(ratios):.2f}x |")
    if not rows:
        return []
    return ["", f"Per round, {title} (samples/s ratio within each round):", "",
            "| policy | per round | median |", "|---|---|---:|", *rows]  # fmt: skip


def render(path: str) -> None:
    """Rewrite the markdown table next to a results JSON (same name, ``.md``) from the JSON."""
    with open(path) as f:
        saved = json.load(f)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(markdown(saved["results"], saved["config"], saved["meta"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 warm-up + 5 timed steps, 1 round")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="rounds (every contender once per round)")
    p.add_argument("--only", default=None, help="comma-separated substrings of contender names to run")
    p.add_argument("--out", default=RESULTS, help="output directory")
    p.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    p.add_argument("--microbatches", type=int, default=None, help="micro-batches per batch (default: the model's)")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md of a saved results JSON")
    p.add_argument("--pin", action="store_true",
                   help="pin every one-thread process to one core (rank %% cpus), for every contender alike")
    a = p.parse_args()
    if a.pin:
        os.environ["ASYNCPIPE_BENCH_PIN"] = "1"  # read by every worker, spawned or started by Lightning
    if a.model != MODEL or (a.microbatches is not None and a.microbatches != MICROBATCHES):
        # the module-level model constants follow the environment: re-run with it set
        env = {**os.environ, "ASYNCPIPE_BENCH_MODEL": a.model}
        if a.microbatches is not None:
            env["ASYNCPIPE_BENCH_MICROBATCHES"] = str(a.microbatches)
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env).returncode)
    if a.render:  # give the --model and --microbatches of the run: the header names them
        render(a.render)
        return
    name = ("throughput" + ("_gpt" if MODEL == "gpt" else "") + ("" if a.stages == 2 else f"_{a.stages}stages")
            + (f"_m{MICROBATCHES}" if a.microbatches is not None else "") + ("_pinned" if a.pin else ""))  # fmt: skip
    cfg = {
        "stages": a.stages,
        "warmup": a.warmup if a.warmup is not None else (2 if a.quick else 5),
        "steps": a.steps if a.steps is not None else (5 if a.quick else 20),
        "repeats": a.repeats if a.repeats is not None else (1 if a.quick else 5),
    }
    meta = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "backend": "gloo", "pinned": bool(a.pin)}  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    selected = contenders(a.stages)
    if a.only:
        keys = a.only.split(",")
        selected = [c for c in selected if any(k in c["name"] for k in keys)]
    started = time.perf_counter()
    # Rounds: every contender runs once per round, in the same order, one repeat per launch, so a
    # slow period of the host falls on every contender alike instead of on whichever ran then.
    one = {**cfg, "repeats": 1}
    rows: dict[str, dict[str, Any]] = {
        c["name"]: {"name": c["name"], "group": c["group"], "procs": c["procs"], "elapsed_s": [], "rss_mib": [],
                    "peak_stashed_bytes": [], "wall_s": 0.0} for c in selected}  # fmt: skip
    for rnd in range(cfg["repeats"]):
        for c in selected:
            how, kind, arg, world = c["launch"]
            row = rows[c["name"]]
            if row.get("error"):
                continue
            prefix = os.path.join(a.out, f".tmp_{c['name'].replace('/', '_')}")
            t = time.perf_counter()
            try:
                r = (launch_spawn(kind, arg, world, one, prefix) if how == "spawn" else launch_floor(world, one)
                     if how == "floor" else launch_lightning(arg, world, one, prefix))  # fmt: skip
                row["elapsed_s"] += r["elapsed_s"]
                row["rss_mib"] = [max(x) for x in zip(row["rss_mib"], r["rss_mib"])] if row["rss_mib"] else r["rss_mib"]
                row["peak_stashed_bytes"] += [b for b in r["peak_stashed_bytes"] if b is not None]
                row["cores"] = r["cores"]
                status = f"{cfg['steps'] * BATCH / r['elapsed_s'][0]:.1f} samples/s"
            except Exception as err:  # keep going: one failing contender must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"
                status = row["error"][:2000]
            row["wall_s"] += time.perf_counter() - t
            print(f"round {rnd + 1}/{cfg['repeats']} {c['name']:28s} {status}  ({time.perf_counter() - t:.0f} s)",
                  flush=True)  # fmt: skip
    results = []
    for row in rows.values():
        if row["elapsed_s"] and not row.get("error"):
            runs = [cfg["steps"] * BATCH / e for e in row["elapsed_s"]]
            row.update(samples_per_s_runs=runs, samples_per_s=statistics.median(runs),
                       step_ms=1000 * statistics.median(row["elapsed_s"]) / cfg["steps"])  # fmt: skip
            stashed = row.pop("peak_stashed_bytes")
            row["stashed_mib"] = max(stashed) / 2**20 if stashed else None
        results.append(row)
    base = next((r["samples_per_s"] for r in results if r["group"] == "a" and "samples_per_s" in r), None)
    best_c = max((r["samples_per_s"] for r in results if r["group"] == "c" and "samples_per_s" in r), default=None)
    ceilings = {r["name"].split("/")[1]: r["samples_per_s"] for r in results if r["group"] == "e" and "samples_per_s" in r}
    floor_rate = next((r["samples_per_s"] for r in results if r["group"] == "f" and "samples_per_s" in r), None)
    best_zb = max((r["samples_per_s"] for r in results if r["group"] == "c" and "samples_per_s" in r
                   and r["name"].split("/")[1] in TORCH_PP_ZERO_BUBBLE), default=None)  # fmt: skip
    for r in results:
        if "samples_per_s" in r:
            r["vs_a"] = r["samples_per_s"] / base if base else None
            r["vs_best_c"] = r["samples_per_s"] / best_c if best_c else None
            r["vs_floor"] = r["samples_per_s"] / floor_rate if floor_rate else None
            r["vs_best_zb"] = r["samples_per_s"] / best_zb if best_zb else None
            ceiling = ceilings.get(r["name"].split("/")[-1]) if r["group"].startswith("d") else None
            r["vs_ceiling"] = r["samples_per_s"] / ceiling if ceiling else None
    total = time.perf_counter() - started
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump({"config": cfg, "meta": meta, "model": {"name": MODEL, "width": WIDTH, "linear_layers": LAYERS, "batch": BATCH,
                   "microbatches": MICROBATCHES, "lr": LR, "momentum": MOMENTUM}, "total_s": total,
                   "results": results}, f, indent=1)  # fmt: skip
    table = markdown(results, cfg, meta)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"total {total:.0f} s; wrote {a.out}/{name}.json and {name}.md")


if __name__ == "__main__":
    if "--lightning-worker" in sys.argv:
        lightning_worker(sys.argv[1:])
    else:
        main()
