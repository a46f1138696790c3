"""A SIGTERM that reaches a flow-run process after its run has finished ends it quietly.

Prefect's engine leaves its SIGTERM handler (it raises ``TerminationSignal``) installed in a
flow-run process, and Prefect's services (events, logs) drain their queues at interpreter shutdown,
in ``threading``'s exit hooks. A served run that had finished and was still draining when the
runner stopped it (``trace-realign watch`` stopped with Ctrl-C) printed an "Exception ignored ...
TerminationSignal" traceback into watch's output. By then the run's final state is reported: the
SIGTERM only asks a finished process to go, and it now does at once.
"""

from __future__ import annotations

import os
import signal
import threading

_registered = False


def _exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


def exit_quietly_on_sigterm_at_shutdown() -> None:
    """From the start of the interpreter's shutdown on, SIGTERM ends this process at once (exit 143).

    Call it at the end of a flow's body. ``threading``'s exit hooks run last-registered first, so
    this one runs before the drains of the Prefect services the run started; until the shutdown
    begins, Prefect's own handler stays (a SIGTERM during the run still cancels it). Registered
    once per process; a call made once the shutdown has begun does nothing.
    """
    global _registered
    if _registered:
        return
    try:
        threading._register_atexit(_exit_on_sigterm)  # the hooks Prefect's services drain in
    except RuntimeError:  # the shutdown has begun
        return
    _registered = True
