"""The approval gate: a realign run stops after triage until a person approves or rejects it.

The flow pauses with Prefect's ``pause_flow_run(wait_for_input=Approval)``: the run shows as
Paused in the Prefect UI, with the policy diff (or the triage report) as a Markdown artifact and a
Resume form asking for the decision (:func:`approval_input`). Approving resumes the run at the reference stage;
rejecting ends it, nothing trained, in a Cancelled state named ``Rejected``; no decision within
``approval.timeout_s`` fails it, as Prefect fails an expired pause (the manifest says ``EXPIRED``). ``trace-realign approve`` sends the
decision through Prefect's API (``resume_flow_run`` with the input) without the UI.

While a run waits, ``<workdir>/runs/awaiting-approval.json`` says which flow run it is and on which
server; it is removed when the wait ends.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from trace_realign.core.errors import TraceError

_APPROVAL: list[type] = []


def approval_input() -> type:
    """``Approval``, the decision a person gives a paused run (a Prefect ``RunInput``: the UI's
    Resume form): ``approve`` (true: train on this triage; false: end the run, nothing trained)
    and ``note``. Built on first use: importing Prefect reads its settings, and ``approve`` must
    set the server's address first."""
    if not _APPROVAL:
        from prefect.input import RunInput

        class Approval(RunInput):
            approve: bool = Field(description="true: train on this triage; false: end the run, nothing trained")
            note: str = Field("", description="why (kept in the run's manifest)")

        _APPROVAL.append(Approval)
    return _APPROVAL[0]


class GateClosed(TraceError):
    """The run ended at the approval gate: ``state_name`` is ``Rejected`` or ``Expired``."""

    state_name = "Rejected"


class Rejected(GateClosed):
    state_name = "Rejected"


class Expired(GateClosed):
    state_name = "Expired"


def pending_path(workdir: str | Path) -> Path:
    """``<workdir>/runs/awaiting-approval.json``: the run waiting for a decision, while it waits."""
    return Path(workdir, "runs", "awaiting-approval.json")


def artifact_key(run_name: str, kind: str = "approval") -> str:
    """The Prefect artifact key of a run's ``kind`` report (``approval``, ``policy-diff``):
    lowercase letters, digits and dashes, as Prefect requires."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"
    return f"{kind}-{slug}"[:100]


def await_approval(
    report: str,
    *,
    workdir: str | Path,
    run_name: str,
    mlflow_run_id: str,
    timeout_s: float,
    poll_s: float,
    log: Callable[[str], Any] = print,
) -> Any:
    """Show ``report`` (Markdown) as a Prefect artifact of the current flow run and pause the run
    until a person decides; returns the decision (:func:`approval_input`). Raises :class:`Rejected` (approve false) or
    :class:`Expired` (no decision within ``timeout_s`` seconds). Must run inside a flow run."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from trace_realign.tasks.artifacts import write_json_at

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise TraceError("the approval gate needs a flow run (call it from the realign flow)")
    flow_run_id = str(context.flow_run.id)
    create_markdown_artifact(
        key=artifact_key(run_name), markdown=report, description=f"What run {run_name!r} trains on if approved"
    )
    api_url, ui_url = PREFECT_API_URL.value(), PREFECT_UI_URL.value()
    link = f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None
    pending = pending_path(workdir)
    write_json_at(
        {
            "flow_run_id": flow_run_id,
            "api_url": api_url,
            "ui_url": link,
            "mlflow_run_id": mlflow_run_id,
            "run_name": run_name,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "timeout_s": timeout_s,
        },
        pending,
    )
    log(
        f"waiting for approval (up to {timeout_s:g} s): resume or reject flow run {flow_run_id}"
        + (f" at {link}" if link else "")
        + f", or run: trace-realign approve --workdir {workdir} [--reject]"
    )
    try:
        answer = pause_flow_run(
            wait_for_input=approval_input(), timeout=max(1, int(timeout_s)), poll_interval=max(1, int(poll_s)), key="approval"
        )
    except FlowPauseTimeout:
        raise Expired(f"no decision within {timeout_s:g} s at the approval gate: nothing was trained") from None
    finally:
        pending.unlink(missing_ok=True)
    if not answer.approve:
        raise Rejected("rejected at the approval gate" + (f" ({answer.note})" if answer.note else "") + ": nothing was trained")
    log("approved" + (f" ({answer.note})" if answer.note else "") + ": going on to the reference stage")
    return answer


def send_decision(workdir: str | Path, approve: bool, note: str = "", api_url: str | None = None) -> dict[str, Any]:
    """Resume the run waiting in ``workdir`` with the decision ``{approve, note}`` through Prefect's API;
    returns the pending record. Raises TraceError when no run waits there or the server refuses."""
    pending = pending_path(workdir)
    try:
        record = json.loads(pending.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TraceError(f"{pending}: no run is waiting for approval in {workdir}") from None
    url = api_url or record.get("api_url")
    if not url:
        raise TraceError(f"{pending}: the waiting run's Prefect server is unknown; pass --server URL")
    from uuid import UUID

    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: url}):
            resume_flow_run(UUID(record["flow_run_id"]), run_input={"approve": approve, "note": note})
    except NotPausedError:
        raise TraceError(f"flow run {record['flow_run_id']} is not waiting for approval any more") from None
    except FlowPauseTimeout:
        raise TraceError(f"flow run {record['flow_run_id']}: the approval gate has expired") from None
    except Exception as exc:  # the server is gone or refused: one line naming it
        raise TraceError(f"{url}: could not send the decision to flow run {record['flow_run_id']} ({exc})") from None
    return record
