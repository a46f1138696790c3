"""``trace-realign gc``: give back the disk a working folder accumulates, keeping what matters.

Every run adds a manifest, an MLflow parent run with its plots, and (when a stage reruns) new
artifacts; training leaves checkpoints; each realigned adapter is also copied under ``mlruns`` as
the registered model's source. ``gc`` keeps:

* the last ``--keep N`` runs (by their manifests in ``<workdir>/runs``) and everything those
  manifests reference: stage artifacts, the training output, and the MLflow runs that made them
  (a cached stage points at the older run that computed it: that run is kept too);
* every MLflow run a model-registry version was made from (its artifacts are the version's source);
* the verdict cache (``verdicts.sqlite``), always: its answers were paid for;
* checkpoints of a training that has not finished (they are how it resumes).

Everything else goes: artifact files and folders no kept manifest names, checkpoints of finished
trainings, the manifests of older runs, Prefect results whose artifacts are gone (the stage would
recompute anyway), the database of the temporary Prefect server ``run`` starts (a history nothing
shows; ``watch``'s server database stays), leftover temporary files, and the older MLflow runs of this folder (marked
deleted, then purged with MLflow's own ``mlflow gc`` when the tracking store is a database this
process can reach; against a tracking server they are only marked deleted, for its operator's
``mlflow gc``).

Without ``--yes`` it only shows what it would delete and how much space that frees. It holds the
working folder's lock (:mod:`trace_realign.flows.workdir`), so it never deletes under a running run.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_realign.core.errors import TraceError

KEEP_ALWAYS = ("verdicts.sqlite", "verdicts.sqlite-wal", "verdicts.sqlite-shm", "workdir.lock")


@dataclass
class GcPlan:
    """What ``gc`` would delete (paths and MLflow runs) and what it keeps."""

    workdir: Path
    kept_runs: list[str]
    paths: list[Path] = field(default_factory=list)
    mlflow_runs: list[str] = field(default_factory=list)
    bytes: int = 0

    def describe(self) -> list[str]:
        lines = [f"keeping {len(self.kept_runs)} run(s): {', '.join(r[:8] for r in self.kept_runs) or '-'}"]
        for p in self.paths:
            lines.append(f"  delete {p.relative_to(self.workdir)}  ({_human(_size(p))})")
        if self.mlflow_runs:
            lines.append(f"  delete {len(self.mlflow_runs)} MLflow run(s) and their artifacts")
        lines.append(f"frees {_human(self.bytes)} in {self.workdir}")
        return lines


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() or f.is_symlink())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def manifests(workdir: Path) -> list[dict[str, Any]]:
    """Every readable run manifest of the folder, newest first."""
    out = []
    for path in (workdir / "runs").glob("*/manifest.json"):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        manifest["manifest_path"] = str(path)
        out.append(manifest)
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def _referenced(manifest: dict[str, Any]) -> tuple[set[Path], set[str]]:
    """(artifact paths, MLflow run ids) a manifest references."""
    paths: set[Path] = set()
    runs: set[str] = {manifest["run_id"]}
    for info in manifest.get("stages", {}).values():
        if info.get("mlflow_run_id"):
            runs.add(info["mlflow_run_id"])
        for art in (info.get("artifacts") or {}).values():
            for a in art if isinstance(art, list) else [art]:
                if isinstance(a, dict) and a.get("path"):
                    paths.add(Path(a["path"]).resolve())
        output_dir = (info.get("info") or {}).get("output_dir")
        if output_dir:
            paths.add(Path(output_dir).resolve())
    return paths, runs


def _under(path: Path, roots: set[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _holds(path: Path, roots: set[Path]) -> bool:
    return any(path == r or path in r.parents for r in roots)


def _artifact_candidates(artifacts: Path, keep: set[Path]) -> list[Path]:
    """Artifact files and folders no kept manifest references, and checkpoints of finished trainings."""
    out: list[Path] = []
    if not artifacts.is_dir():
        return out
    for stage_dir in sorted(p for p in artifacts.iterdir() if p.is_dir()):
        for entry in sorted(stage_dir.iterdir()):
            entry = entry.resolve()
            if entry.name.startswith(".tmp-"):
                out.append(entry)  # a crash's leftover: nothing runs while gc holds the lock
            elif stage_dir.name == "train" and entry.is_dir():
                finished = (entry / "final").is_dir()
                if _holds(entry, keep):
                    out.extend(c for c in sorted(entry.glob("checkpoint-*")) if finished)
                elif finished:
                    out.append(entry)
                # an unfinished training's checkpoints stay: a rerun resumes from them
            elif not _holds(entry, keep):
                out.append(entry)
    return out


def _stale_results(results: Path, doomed: set[Path]) -> list[Path]:
    """Prefect result files of stages whose artifacts are deleted (or already gone)."""
    out = []
    if not results.is_dir():
        return out
    import cloudpickle

    for f in sorted(results.iterdir()):
        if not f.is_file():
            continue
        try:
            payload = json.loads(f.read_text(encoding="utf-8"))
            result = cloudpickle.loads(base64.b64decode(payload["result"]))
            paths = [Path(p).resolve() for p in result.artifact_paths()]
        except Exception:  # not one of ours, or unreadable: leave it to Prefect
            continue
        if any(_under(p, doomed) or not p.exists() for p in paths):
            out.append(f)
    return out


def plan_gc(workdir: str | Path, keep: int, uri: str | None = None) -> GcPlan:
    """What ``gc`` deletes in ``workdir`` keeping the last ``keep`` runs (see the module doc)."""
    if keep < 1:
        raise TraceError(f"--keep {keep}: keep at least the last run")
    folder = Path(workdir).resolve()
    if not (folder / "runs").is_dir():
        raise TraceError(f"{folder}: not a trace-realign working folder (no runs/ in it)")
    all_manifests = manifests(folder)
    kept = all_manifests[:keep]
    keep_paths: set[Path] = set()
    keep_runs: set[str] = set()
    for m in kept:
        paths, runs = _referenced(m)
        keep_paths |= paths
        keep_runs |= runs
    plan = GcPlan(folder, [m["run_id"] for m in kept])
    plan.paths += _artifact_candidates(folder / "artifacts", keep_paths)
    kept_ids = {m["run_id"] for m in kept}
    plan.paths += [Path(m["manifest_path"]).parent for m in all_manifests[keep:] if m["run_id"] not in kept_ids]
    doomed = set(plan.paths)
    plan.paths += _stale_results(folder / "prefect" / "results", doomed)
    # The temporary Prefect server of ``run`` keeps a history no one browses (the stage cache is in
    # the result files); ``watch``'s server (server.db) holds the UI's history and stays.
    plan.paths += sorted((folder / "prefect").glob("prefect.db*"))

    from trace_realign.tasks import tracking

    uri = uri or _tracking_uri(folder, all_manifests)
    plan.mlflow_runs = tracking.runs_to_delete(uri, folder, keep_runs)
    plan.bytes = sum(_size(p) for p in plan.paths) + tracking.artifact_bytes(uri, plan.mlflow_runs)
    return plan


def _tracking_uri(folder: Path, all_manifests: list[dict[str, Any]]) -> str:
    from trace_realign.tasks import tracking

    for m in all_manifests:
        configured = (m.get("config") or {}).get("mlflow", {}).get("tracking_uri")
        if configured:
            return configured
    return tracking.tracking_uri(folder, None)


def apply_gc(plan: GcPlan, uri: str) -> None:
    """Delete what ``plan`` lists: files and folders, then the MLflow runs (purged where possible)."""
    from trace_realign.tasks import tracking

    for p in plan.paths:
        if p.name in KEEP_ALWAYS:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    if plan.mlflow_runs:
        tracking.delete_runs(uri, plan.mlflow_runs)
        if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
            env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_TRACKING_URI": uri}
            cmd = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--run-ids", ",".join(plan.mlflow_runs)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise TraceError(f"mlflow gc failed on {uri} (runs are marked deleted; rerun gc to purge): {last}")


def cmd_gc(args) -> int:
    """``trace-realign gc --workdir DIR [--keep N] [--yes]``."""
    from trace_realign.flows.workdir import workdir_lock

    if not Path(args.workdir, "runs").is_dir():
        raise TraceError(f"{Path(args.workdir).resolve()}: not a trace-realign working folder (no runs/ in it)")
    with workdir_lock(args.workdir, "trace-realign gc") as folder:
        uri = args.tracking_uri or _tracking_uri(folder, manifests(folder))
        plan = plan_gc(folder, args.keep, uri)
        for line in plan.describe():
            print(line)
        if not plan.paths and not plan.mlflow_runs:
            print("nothing to delete")
            return 0
        if not args.yes:
            print("dry run: rerun with --yes to delete")
            return 0
        apply_gc(plan, uri)
        print(f"deleted; freed {_human(plan.bytes)}")
    return 0
