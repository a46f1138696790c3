"""The per-stage peak memory meter (flows/meter.py): what it counts and what it leaves out."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from trace_realign.flows.meter import MemoryMeter

MB = 1024 * 1024
CHILD = (
    "import sys\n"
    "block = bytearray({mib} * 1024 * 1024)\n"
    "for i in range(0, len(block), 4096):\n"
    "    block[i] = 1\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)
WAIT_S = 30.0
"""How long a test waits for the sampler to see a child that is already holding its memory (a
condition, polled; it takes one 0.05 s sample on an idle machine)."""


def _child(mib: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(mib=mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=WAIT_S)


def _wait_for(meter: MemoryMeter, mib: float) -> None:
    deadline = time.monotonic() + WAIT_S
    while meter.peak_mib < mib and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_peak_freed_before_the_end_is_counted():
    """300 MiB allocated and freed inside the block, with no sample in between: the peak still holds
    it, from the process's high-water mark read at the end. In a fresh process, whose high-water
    mark the block raises (this test process may already have been bigger)."""
    code = (
        "import psutil\n"
        "from trace_realign.flows.meter import MemoryMeter\n"
        "base = psutil.Process().memory_info().rss / 2**20\n"
        "with MemoryMeter(interval=3600) as meter:\n"  # one sample at the start, the next at the end
        "    block = bytearray(300 * 2**20)\n"
        "    for i in range(0, len(block), 4096):\n"
        "        block[i] = 1\n"
        "    del block\n"
        "print(base, meter.peak_mib)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    base, peak = map(float, out.stdout.split())
    assert peak >= base + 250, out.stdout


def test_processes_started_in_the_block_count_and_older_ones_do_not():
    older = _child(300)  # running before the block: like Prefect's temporary server
    try:
        base = psutil.Process().memory_info().rss / MB
        with MemoryMeter() as quiet:
            pass
        assert quiet.peak_mib < base + 150

        with MemoryMeter() as meter:
            child = _child(200)
            try:
                _wait_for(meter, base + 150)
            finally:
                _stop(child)
        assert base + 150 <= meter.peak_mib < base + 200 + 300  # the new child, never the older one
    finally:
        _stop(older)
