"""Running a multi-process script from a test with a hard timeout and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"


@dataclass
class Result:
    returncode: int
    output: str
    elapsed: float


def run_script(name: str, *args: object, timeout: float = 240, env: dict[str, str] | None = None,
               launcher: list[str] | None = None) -> Result:  # fmt: skip
    """Run ``tests/scripts/<name>`` in its own session; on timeout kill the whole process group.

    ``launcher`` replaces ``[python]`` in front of the script (e.g. a torchrun command).

    Raises:
        AssertionError: if the script runs past ``timeout`` (the output so far is in the message).
    """
    import time

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        full_env.pop(var, None)  # left by in-process Trainers; each launch picks its own free port
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen(
        [*(launcher or [sys.executable]), str(name if Path(str(name)).is_absolute() else SCRIPTS / name), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=str(ROOT),
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{name} {args} ran past {timeout} s; output:\n{out[-6000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the main process
        except ProcessLookupError:
            pass
    return Result(proc.returncode, out, time.monotonic() - start)


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes whose command line contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and str(os.getpid()) != pid:
            found.append(cmd)
    return found


def child_processes() -> list[int]:
    """PIDs of live processes whose parent is this process."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = (Path("/proc") / pid / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(pid))
    return found


def start_script(name: str, *args: object) -> subprocess.Popen:
    """Start ``tests/scripts/<name>`` in its own session with its output piped (see :func:`signal_rank`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK",
                                                             "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")}  # fmt: skip
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def signal_rank(proc: subprocess.Popen, out: Path, n_ranks: int, target: int, signum: int) -> tuple[str, float, dict]:
    """Wait until every rank wrote ``out/rank<R>.pid`` (JSON with its pid), send ``signum`` to rank
    ``target`` and wait for every process holding the output to end (then kill what is left).

    Returns:
        the output, the seconds from the signal until every process ended, the target's record.
    """
    import json
    import time

    try:
        deadline = time.monotonic() + 120
        while not all((out / f"rank{r}.pid").exists() for r in range(n_ranks)):
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "the run did not reach the step that writes the pid files"
            time.sleep(0.2)
        time.sleep(0.5)  # the files are complete
        victim = json.loads((out / f"rank{target}.pid").read_text())
        os.kill(victim["pid"], signum)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=90)  # returns when every process holding the output has ended
        return output, time.monotonic() - sent, victim
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
