"""Running a stage's work on several processes: one launcher subprocess, one rank per process.

The stage writes its job into a fresh folder (``spec.json``, the settings; ``payload.pkl``, the
samples) and starts a launcher on ``python -m trace_realign.core.distributed FOLDER``:

- ``torchrun`` (``python -m torch.distributed.run``): ranks on the gloo backend, the CPU path;
- ``accelerate launch`` with an accelerate config (the shipped ``configs/accelerate/ddp.yaml``,
  or ``fsdp.yaml`` beside it): DDP or FSDP on GPUs with NCCL.

Every rank runs the job's function (:data:`JOBS`) with the same code as a one-process run; ranks
find their place from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). A rank
that raises writes its error to ``rank-<r>.error``; rank 0 writes what comes back
(``result.json`` or the job's own files). Both launchers stop the other ranks when one fails.
The ranks' output goes to ``ranks.log`` in the folder and to the caller's stderr. Launcher addresses
are 127.0.0.1 on a free port.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from trace_realign.core.errors import ConfigError, TraceError
from trace_realign.core.resources import SHIPPED_ROOT

SHIPPED_ACCELERATE_CONFIGS = SHIPPED_ROOT / "configs" / "accelerate"
"""The shipped accelerate configs: ``ddp.yaml`` (the default) and ``fsdp.yaml``."""

JOBS = {
    "train": "trace_realign.core.training:train_rank",
    "scores": "trace_realign.core.reference:scores_rank",
}
"""Job kind -> ``module:function`` that every rank runs with its :class:`RankJob`."""

KILL_GRACE_S = 10.0
"""Seconds the launcher's process group gets to exit after SIGTERM before SIGKILL."""


class RankFailed(TraceError):
    """A rank of a multi-process job failed; the message is one line naming the stage, the rank
    and the rank's last error."""

    def __init__(self, message: str, rank: int | None, error: str):
        super().__init__(message)
        self.rank = rank
        self.error = error


@dataclass(frozen=True)
class Launch:
    """How a job's ranks are started: ``num_processes`` ranks by ``launcher`` (``torchrun`` or
    ``accelerate``, never ``auto``: see :meth:`of`), the latter with ``accelerate_config``."""

    num_processes: int
    launcher: Literal["torchrun", "accelerate"] = "torchrun"
    accelerate_config: Path | None = None

    @classmethod
    def of(cls, training) -> "Launch":
        """The launch of a training section (``num_processes``, ``launcher``, ``accelerate_config``):
        ``auto`` is accelerate where a GPU is visible, else torchrun. Raises ConfigError naming
        ``training.accelerate_config`` when that file does not exist."""
        launcher = training.launcher
        if launcher == "auto":
            launcher = "accelerate" if torch.cuda.is_available() else "torchrun"
        config = Path(training.accelerate_config) if training.accelerate_config else SHIPPED_ACCELERATE_CONFIGS / "ddp.yaml"
        if launcher == "accelerate" and not config.is_file():
            raise ConfigError(f"training.accelerate_config: file not found: {config}")
        return cls(training.num_processes, launcher, config if launcher == "accelerate" else None)


@dataclass(frozen=True)
class RankJob:
    """What a rank is given: its job folder, the job's settings, its rank and the world size."""

    folder: Path
    spec: dict
    rank: int
    world_size: int

    def payload(self) -> Any:
        """The job's samples, as the caller passed them to :func:`run_job`."""
        with open(self.folder / "payload.pkl", "rb") as f:
            return pickle.load(f)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(launch: Launch, folder: Path, port: int) -> list[str]:
    """The command line that starts ``launch.num_processes`` ranks on ``folder``'s job."""
    entry = ["-m", "trace_realign.core.distributed", str(folder)]
    n = str(launch.num_processes)
    if launch.launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", n,
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0", *entry,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.accelerate_config),
        "--num_processes", n, "--num_machines", "1", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port), *entry,
    ]  # fmt: skip


def rank_device(setting: str) -> str:
    """The device of this rank for a ``model.device`` setting: ``cuda:<LOCAL_RANK>`` where the setting
    resolves to a GPU, else the setting as resolved (``cpu``)."""
    from trace_realign.core.modeling import resolve_device

    device = resolve_device(setting)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def init_process_group() -> None:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs) unless already joined."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _tee(stream, log_path: Path, echo: bool) -> None:
    """Copy the launcher's output to the log (and stderr) until it closes: the pipe never fills up."""
    with open(log_path, "ab") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()
            if echo:
                with contextlib.suppress(Exception):  # an odd stderr must not stop the copying
                    sys.stderr.write(line.decode("utf-8", "replace"))
                    sys.stderr.flush()


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks (its process group): SIGTERM, then SIGKILL after the grace."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a rank the launcher left behind
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_log_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def failure(folder: Path, stage: str, returncode: int) -> RankFailed:
    """The one-line error of a failed job: the rank whose error was written first (the cause; the
    others' errors follow from it), or the launcher's last log line when no rank wrote one."""
    errors = sorted(folder.glob("rank-*.error"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        rank = int(errors[0].stem.split("-")[1])
        error = errors[0].read_text(encoding="utf-8").strip().splitlines()[-1]
        return RankFailed(f"{stage}: rank {rank} failed: {error} (exit {returncode}; log: {folder / 'ranks.log'})", rank, error)
    error = _last_log_line(folder / "ranks.log")
    return RankFailed(f"{stage}: the launcher failed with exit {returncode}: {error} (log: {folder / 'ranks.log'})", None, error)


def run_job(
    kind: str,
    spec: dict,
    payload: Any,
    folder: str | Path,
    launch: Launch,
    *,
    stage: str,
    echo: bool = True,
    timeout: float | None = None,
) -> Path:
    """Run job ``kind`` (a key of :data:`JOBS`) on ``launch.num_processes`` ranks and wait for them.

    ``folder`` is emptied and receives the job (``spec``: JSON-able settings, ``payload``: picklable
    samples), the ranks' log ``ranks.log`` (also echoed to stderr with ``echo``) and what the ranks
    write back; it is returned. ``timeout`` (seconds, None: none) bounds the whole job. The
    launcher runs in its own process group, stopped on timeout, on an exception here (Ctrl-C
    included) and after it exits. Raises :class:`RankFailed` (one line: ``stage``, the failing rank,
    its last error) when a rank fails, and TraceError on timeout.
    """
    if kind not in JOBS:
        raise TraceError(f"unknown multi-process job '{kind}' (known: {', '.join(JOBS)})")
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"kind": kind, **spec}, indent=2), encoding="utf-8")
    with open(folder / "payload.pkl", "wb") as f:
        pickle.dump(payload, f)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = launcher_command(launch, folder, free_port())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    reader = threading.Thread(target=_tee, args=(proc.stdout, folder / "ranks.log", echo), daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        reader.join()
        raise TraceError(f"{stage}: {launch.num_processes} processes did not finish within {timeout:.0f} s (log: {folder / 'ranks.log'})") from None
    finally:
        _stop(proc)
        reader.join()
        proc.stdout.close()
    if returncode != 0:
        raise failure(folder, stage, returncode)
    return folder


def call_job(function: Callable[[RankJob], None], job: RankJob) -> None:
    """Run ``function`` as rank ``job.rank``: a raised error is written to ``rank-<r>.error`` (its
    type and message) before it propagates; the process group is destroyed at the end either way
    (a rank that exits without doing so aborts)."""
    import torch.distributed as dist

    try:
        function(job)
    except BaseException as exc:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        (job.folder / f"rank-{job.rank}.error").write_text(message + "\n", encoding="utf-8")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """The rank entry point: ``python -m trace_realign.core.distributed FOLDER`` under a launcher."""
    (folder,) = sys.argv[1:] if argv is None else argv
    folder = Path(folder)
    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    module, name = JOBS[spec["kind"]].split(":")
    function = getattr(importlib.import_module(module), name)
    job = RankJob(folder, spec, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    call_job(function, job)


if __name__ == "__main__":
    main()
