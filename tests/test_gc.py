"""``trace-realign gc``: what the last runs need stays, the rest goes, the verdict cache always stays."""

from __future__ import annotations

from pathlib import Path


from trace_realign.flows.gc import apply_gc, plan_gc
from tests.test_pipeline import ROOT, cached, cli, judge, make_config, requests_made, run_flow  # noqa: F401
from tests.test_workdir import hold_lock


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_gc_keeps_what_the_last_runs_reference_and_frees_the_rest(tmp_path, judge):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    cfg = make_config(tmp_path, judge.url)
    old = run_flow(cfg, until="train")
    cfg["training"]["learning_rate"] = 0.004  # a second training: new train artifacts, same judging
    middle = run_flow(cfg, until="train")
    last = run_flow(cfg, until="train")  # answered from the cache
    assert all(cached(last).values())
    work = Path(cfg["run"]["workdir"]).resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    old_train = Path(old["stages"]["train"]["info"]["output_dir"]).parent
    kept_train = Path(last["stages"]["train"]["info"]["output_dir"]).parent
    assert old_train != kept_train and any(kept_train.glob("checkpoint-*"))  # save_steps=2: checkpoints left

    plan = plan_gc(work, keep=1)
    rel = {str(p.relative_to(work)) for p in plan.paths}
    assert f"runs/{old['run_id']}" in rel and f"runs/{middle['run_id']}" in rel and f"runs/{last['run_id']}" not in rel
    assert str(old_train.relative_to(work)) in rel
    assert {str(c.relative_to(work)) for c in kept_train.glob("checkpoint-*")} <= rel  # finished: checkpoints go
    assert not any(r.startswith("verdicts.sqlite") for r in rel)
    assert old["run_id"] in plan.mlflow_runs and last["run_id"] not in plan.mlflow_runs
    # Every stage run the kept manifest points at stays, including those of cached stages made by older runs.
    kept_stage_runs = {info["mlflow_run_id"] for info in last["stages"].values()}
    assert not kept_stage_runs & set(plan.mlflow_runs)
    # So do the runs the registered model versions were made from.
    client = MlflowClient(tracking_uri=uri)
    registered = {mv.run_id for mv in client.search_model_versions("name='pipeline-test-realigned'")}
    assert len(registered) == 2 and not registered & set(plan.mlflow_runs)

    before = folder_bytes(work)
    assert plan.bytes > 0
    apply_gc(plan, uri)
    assert folder_bytes(work) < before
    assert (work / "verdicts.sqlite").is_file()
    all_runs = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)}
    assert old["run_id"] not in all_runs and last["run_id"] in all_runs  # purged by mlflow gc
    # The last run is whole: a rerun is answered from the cache and asks the judge nothing.
    asked = requests_made(judge)
    again = run_flow(cfg, until="train")
    assert all(cached(again).values()) and requests_made(judge) == asked
    assert plan_gc(work, keep=2).paths == [] and plan_gc(work, keep=2).mlflow_runs == []
    # Keeping only the rerun: it references the same artifacts and stage runs, so only the earlier
    # run's manifest and its parent MLflow run are left to delete.
    again_plan = plan_gc(work, keep=1)
    assert again_plan.paths == [work / "runs" / last["run_id"]] and again_plan.mlflow_runs == [last["run_id"]]


def test_gc_cli_is_a_dry_run_without_yes_and_refuses_a_busy_folder(tmp_path, judge):
    cfg = make_config(tmp_path, judge.url)
    run_flow(cfg, until="triage")
    run_flow(cfg, until="triage")
    work = Path(cfg["run"]["workdir"])
    listing = {p: p.stat().st_size for p in work.rglob("*") if p.is_file()}
    shown = cli(["gc", "--workdir", str(work), "--keep", "1"], ROOT)
    assert shown.returncode == 0 and "dry run" in shown.stdout and "delete runs/" in shown.stdout and "frees " in shown.stdout
    assert all(p.exists() for p in listing)  # nothing deleted
    holder = hold_lock(work)
    try:
        busy = cli(["gc", "--workdir", str(work), "--keep", "1", "--yes"], ROOT)
        assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        holder.kill()
        holder.wait()
    done = cli(["gc", "--workdir", str(work), "--keep", "1", "--yes"], ROOT)
    assert done.returncode == 0 and "freed" in done.stdout, done.stderr[-2000:]
    assert len(list((work / "runs").glob("*/manifest.json"))) == 1
    missing = cli(["gc", "--workdir", str(tmp_path / "nothing-here")], ROOT)
    assert missing.returncode == 2 and "not a trace-realign working folder" in missing.stderr
