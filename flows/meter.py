"""Peak resident memory of a stage, for the run manifest and MLflow.

A stage's peak is what sizes the machine it needs, and the process-wide high-water mark
(``ru_maxrss``) cannot say which stage set it. :class:`MemoryMeter` samples, on a daemon thread,
the resident set of this process plus that of every process started while the block runs (a
training launcher's ranks, a vLLM engine), and keeps the largest sum. Processes that were already
running (Prefect's temporary server) are left out. It only reads ``/proc`` (through psutil): it
never resets the kernel's high-water mark, so ``ru_maxrss`` and ``/usr/bin/time`` still tell the
truth about the whole process.

Sampling misses a peak shorter than the interval (0.05 s); the high-water mark of this process
(``VmHWM``) is read at the end as well, and counts when the block raised it.
"""

from __future__ import annotations

import threading

import psutil

MIB = 1024 * 1024


def _high_water_mib(proc: psutil.Process) -> float | None:
    """The process's peak resident set so far (Linux ``VmHWM``), None where unknown."""
    try:
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class MemoryMeter:
    """``with MemoryMeter() as m: ...`` then ``m.peak_mib``: the largest resident memory (MiB) of
    this process and the processes started during the block, summed, seen while it ran.

    ``interval`` is the sampling period in seconds. Errors reading a process that has just exited
    are ignored; the meter never raises into the block it measures.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mib = 0.0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._older: set[int] = set()
        self._hwm_before: float | None = None

    def _sample(self) -> float:
        total = self._proc.memory_info().rss
        try:
            children = self._proc.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid in self._older:
                continue
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        return total / MIB

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, self._sample())
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemoryMeter":
        try:
            self._older = {p.pid for p in self._proc.children(recursive=True)}
        except psutil.Error:
            self._older = set()
        self._hwm_before = _high_water_mib(self._proc)
        self._thread = threading.Thread(target=self._run, name="trace-memory-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.peak_mib = max(self.peak_mib, self._sample())
        except psutil.Error:
            pass
        after = _high_water_mib(self._proc)
        if after is not None and self._hwm_before is not None and after > self._hwm_before:
            # This block raised the process's own high-water mark, possibly between two samples.
            self.peak_mib = max(self.peak_mib, after)
