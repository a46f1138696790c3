"""One run at a time per working folder.

A working folder holds one verdict cache, one Prefect result store, one MLflow store and the
stages' artifacts, written in place. Two runs in one folder would pay twice for the same judge
questions, race on the stores' set-up and train into the same checkpoint folder; so every command
that writes there (``run``, a served realign run, ``gc``) holds an exclusive advisory lock on
``<workdir>/workdir.lock`` for its whole duration.

The lock is ``flock(2)``: the kernel releases it when its holder exits, however it exits (SIGKILL
included), so a dead run can never hold a folder. The holder writes its pid, start time and
command into the file; a second command reads them for its one-line error::

    another run (pid 4242, started 2026-11-30T10:00:00+00:00, trace-realign run) is using the
    working folder /home/me/.trace; wait for it to finish or set another run.workdir

A process may take the lock again while it holds it (the ``run`` command takes it before it starts
Prefect's local server, whose database lives in the folder, and the flow takes it again).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trace_realign.core.errors import TraceError

LOCK_NAME = "workdir.lock"
POLL_SECONDS = 1.0
# A holder writes its details just after it takes the lock; a process refused in between reads an
# empty file (a new folder) or the last holder's details (a dead pid). It looks again for this long.
DETAILS_GRACE_S = 2.0


class WorkdirBusy(TraceError):
    """Another live process holds the working folder's lock."""


_held: dict[Path, list[Any]] = {}  # resolved workdir -> [open file, depth]
_held_guard = threading.Lock()


def lock_path(workdir: str | Path) -> Path:
    """The lock file of a working folder."""
    return Path(workdir).resolve() / LOCK_NAME


def read_holder(workdir: str | Path) -> dict[str, Any]:
    """What the current (or last) holder wrote: ``{pid, started, command, host}``; ``{}`` if unreadable."""
    try:
        info = json.loads(lock_path(workdir).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def current_holder(workdir: str | Path, grace_s: float = DETAILS_GRACE_S) -> dict[str, Any]:
    """The details of the live process holding the lock, read again for up to ``grace_s`` seconds
    while they are missing or name a process that is gone (the holder has not written them yet);
    ``{}`` if they never appear."""
    deadline = time.monotonic() + grace_s
    while True:
        holder = read_holder(workdir)
        elsewhere = holder.get("host") not in (None, socket.gethostname())
        if holder.get("pid") and (elsewhere or _alive(holder["pid"])):
            return holder
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def busy_message(workdir: str | Path, holder: dict[str, Any]) -> str:
    """The one line a second command prints."""
    who = ", ".join(
        x
        for x in (
            f"pid {holder['pid']}" if holder.get("pid") else "",
            f"started {holder['started']}" if holder.get("started") else "",
            str(holder.get("command") or ""),
        )
        if x
    )
    return (
        f"another run ({who or 'a process that has not written its details yet'}) is using the working folder "
        f"{Path(workdir).resolve()}; wait for it to finish or set another run.workdir"
    )


@contextlib.contextmanager
def workdir_lock(
    workdir: str | Path,
    command: str,
    wait_s: float | None = 0.0,
    on_wait: Callable[[str], Any] | None = None,
) -> Iterator[Path]:
    """Hold ``<workdir>/workdir.lock`` exclusively for the block; yields the resolved folder.

    ``wait_s``: 0 fails at once with :class:`WorkdirBusy` when another process holds the folder;
    a positive number waits up to that many seconds; None waits as long as it takes (served runs
    queue behind each other this way). ``on_wait(line)`` is told once when waiting starts.
    Re-entrant within one process. Raises TraceError when the folder cannot be created.
    """
    folder = Path(workdir).resolve()
    with _held_guard:
        entry = _held.get(folder)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield folder
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path(folder), "a+", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{folder}: cannot use the working folder ({exc.strerror})") from None
    try:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                message = busy_message(folder, current_holder(folder))
                if deadline is not None and time.monotonic() >= deadline:
                    raise WorkdirBusy(message) from None
                if not told and on_wait is not None:
                    on_wait(f"waiting: {message}")
                    told = True
                time.sleep(POLL_SECONDS)
        holder = {
            "pid": os.getpid(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "host": socket.gethostname(),
            "argv": sys.argv[:1],
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder))
        handle.flush()
        with _held_guard:
            _held[folder] = [handle, 1]
        try:
            yield folder
        finally:
            with _held_guard:
                _held.pop(folder, None)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
