"""A SIGTERM that reaches a finished flow-run process while Prefect drains at shutdown ends it quietly."""

import subprocess
import sys
import textwrap

import pytest

# A flow-run process at its end: Prefect's SIGTERM handler installed (the engine leaves it), a
# service's drain registered in threading's exit hooks before the flow body ended, and during that
# drain the runner's SIGTERM arrives (watch stopped with Ctrl-C).
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from prefect.utilities.engine import _prefect_sigterm_handler

    signal.signal(signal.SIGTERM, _prefect_sigterm_handler)

    def drain():  # what Prefect's services do in their exit hook: wait for their queue
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    threading._register_atexit(drain)
    if sys.argv[1] == "fixed":
        from trace_realign.flows.shutdown import exit_quietly_on_sigterm_at_shutdown

        exit_quietly_on_sigterm_at_shutdown()  # at the end of the flow body
        exit_quietly_on_sigterm_at_shutdown()  # once per process
    print("flow body done", flush=True)
    """
)


@pytest.mark.parametrize("variant", ["fixed", "unfixed"])
def test_a_sigterm_during_the_shutdown_drain_ends_the_process_quietly(variant):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, variant], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "flow body done\n"
    if variant == "fixed":
        assert proc.returncode == 143 and proc.stderr == ""
    else:  # the failure the fix removes: the traceback watch printed
        assert "TerminationSignal" in proc.stderr and "Exception ignored" in proc.stderr


def test_a_sigterm_during_the_run_is_still_prefects():
    """Registering the hook changes nothing before the shutdown: Prefect's handler still cancels a run."""
    script = textwrap.dedent(
        """
        import os, signal
        from prefect.exceptions import TerminationSignal
        from prefect.utilities.engine import _prefect_sigterm_handler
        from trace_realign.flows.shutdown import exit_quietly_on_sigterm_at_shutdown

        signal.signal(signal.SIGTERM, _prefect_sigterm_handler)
        exit_quietly_on_sigterm_at_shutdown()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except TerminationSignal:
            print("cancelled by Prefect's handler")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "cancelled by Prefect's handler\n", proc.stderr
