"""The realign flow end to end on a tiny model, with an OpenAI-compatible judge on 127.0.0.1.

Flow runs happen in this process (the Prefect server starts once per session); the CLI's
behaviour on bad input and under SIGKILL is checked in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.oracle_fakes import FakeJudgeProcess, FakeJudgeServer

ROOT = Path(__file__).resolve().parents[1]
POLICY = """---
name: pipeline-test
version: 1
---
Answer educational questions helpfully; refuse anything that helps hurt people.
"""


def write_pairs(path: Path, n: int = 24) -> Path:
    """Pairs whose verdicts (by the fake judge's [violates] marker) give all three triage types."""
    rows = []
    for i in range(n):
        kind = i % 3
        prompt = f"Question {i}: tell me about topic {i}."
        if kind == 0:  # INVERT: old winner violates, old loser complies
            chosen, rejected = f"I refuse to discuss topic {i}. [violates]", f"Topic {i} is explained here."
        elif kind == 1:  # PUNISH: both violate
            chosen, rejected = f"No topic {i}. [violates]", f"Harmful steps for {i}. [violates]"
        else:  # RETAIN: old winner complies
            chosen, rejected = f"A careful answer on {i}.", f"Dangerous detail on {i}. [violates]"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(tmp: Path, judge_url: str, **sections) -> dict:
    write_pairs(tmp / "pairs.jsonl")
    (tmp / "policy.md").write_text(POLICY)
    cfg = {
        "run": {"name": "pipeline-test", "workdir": str(tmp / "work")},
        "model": {"path": "tiny-random"},
        "data": {"path": str(tmp / "pairs.jsonl"), "shard_size": 8},
        "policy": {"path": str(tmp / "policy.md")},
        "oracle": {"backend": "openai", "model": "fake-judge", "base_url": judge_url, "api_key_env": None,
                   "max_concurrency": 4, "timeout_s": 5, "max_retries": 1},
        "weights": {"gold_size": 6, "batch_size": 8},
        "training": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_length": 96, "learning_rate": 0.005,
                     "warmup_steps": 0, "max_steps": 4, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                     "logging_steps": 1, "save_steps": 2},
        "evaluation": {"enabled": False},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def judge():
    with FakeJudgeServer() as server:
        yield server


def requests_made(server) -> int:
    return sum(server.counts.values())


def run_flow(cfg, **kw):
    from trace_realign.flows.realign import realign

    return realign(cfg, progress=False, **kw)


def cached(manifest) -> dict[str, bool]:
    return {k: v["cached"] for k, v in manifest["stages"].items()}


def test_rerun_is_cached_and_policy_edit_invalidates_from_judge_on(tmp_path, judge):
    cfg = make_config(tmp_path, judge.url)
    first = run_flow(cfg, until="train")
    asked = requests_made(judge)
    assert asked == 48  # 24 pairs, two responses each
    assert not any(cached(first).values())
    assert first["stages"]["triage"]["metrics"]["triage_invert"] == 8
    assert first["stages"]["triage"]["metrics"]["triage_punish"] == 8
    assert first["stages"]["triage"]["metrics"]["triage_retain"] == 8

    second = run_flow(cfg, until="train")
    assert all(cached(second).values()), cached(second)
    assert requests_made(judge) == asked and second["judge_requests"] == 0
    # (How much faster the cached rerun is, is measured by benchmarks/pipeline_overhead.py, not timed here.)
    assert second["stages"]["train"]["artifacts"] == first["stages"]["train"]["artifacts"]

    policy = Path(cfg["policy"]["path"])
    policy.write_text(POLICY.replace("helpfully", "helpfully and even-handedly"))
    edited = run_flow(cfg, until="train")
    flags = cached(edited)
    assert flags["load"] is True
    assert not any(v for k, v in flags.items() if k != "load"), flags
    assert requests_made(judge) == asked + 48  # a new policy is a new question

    policy.write_text(POLICY)
    reverted = run_flow(cfg, until="train")
    assert all(cached(reverted).values())
    assert requests_made(judge) == asked + 48


def test_failed_training_rerun_reuses_earlier_stages(tmp_path, judge):
    from trace_realign.core.training import InjectedFailure

    cfg = make_config(tmp_path, judge.url)
    crashing = json.loads(json.dumps(cfg))
    crashing["training"]["fail_at_step"] = 2
    with pytest.raises(InjectedFailure):
        run_flow(crashing, until="train")
    asked = requests_made(judge)
    rerun = run_flow(cfg, until="train")
    flags = cached(rerun)
    assert all(flags[k] for k in flags if k.startswith("judge-")) and flags["triage"] and flags["reference"]
    assert flags["train"] is False
    assert requests_made(judge) == asked
    assert rerun["stages"]["train"]["metrics"]["global_step"] == 4
    # Training resumed from the checkpoint the crashed run left behind.
    work = Path(cfg["run"]["workdir"], "artifacts", "train")
    assert any(work.glob("*/checkpoint-2"))


def test_mlflow_holds_parent_and_stage_runs(tmp_path, judge):
    from mlflow import MlflowClient

    cfg = make_config(tmp_path, judge.url)
    manifest = run_flow(cfg, until="train")
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cfg['run']['workdir']).resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trace-realign")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == manifest["run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["policy_sha256"] == manifest["policy"]["sha256"]
    assert parent.data.tags["data_sha256"] == manifest["data"]["sha256"]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"load", "judge-0000", "judge-0001", "judge-0002", "triage", "reference", "train"} <= set(children)
    assert children["triage"].data.metrics["triage_invert"] == 8
    # What each stage cost this run: on the parent run as in the manifest (a Python process with torch is > 100 MiB).
    for stage in ("load", "reference", "train"):
        assert parent.data.metrics[f"{stage}.peak_rss_mib"] == manifest["stages"][stage]["peak_rss_mib"] > 100
        assert parent.data.metrics[f"{stage}.seconds"] == pytest.approx(manifest["stages"][stage]["seconds"])
    assert "model_preparation" not in manifest  # tiny-random was prepared before
    assert "train/loss" in client.get_metric_history(children["train"].info.run_id, "train/loss")[0].key
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "manifest.json" in artifacts and "plots" in artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/triage_counts.png", "plots/impact_weights.png"} <= plots
    versions = client.search_model_versions("name='pipeline-test-realigned'")
    assert versions and versions[0].tags["policy_sha256"] == manifest["policy"]["sha256"]
    manifest_file = json.loads(Path(manifest["manifest_path"]).read_text())
    for stage in ("load", "triage", "reference", "train"):
        for art in manifest_file["stages"][stage]["artifacts"].values():
            for a in art if isinstance(art, list) else [art]:
                assert Path(a["path"]).exists() and len(a["sha256"]) == 64


CLI_TIMEOUT_S = 240
"""The one bound on a CLI run in a test: a smoke run takes 26 to 54 s on 2 idle cores; this leaves room
for a loaded CI machine, and a hang still fails."""


NO_SERVER = {"PREFECT_API_URL": None}
"""``cli(..., env=NO_SERVER)``: the run starts Prefect's temporary server, as a user's first run does
(the session's shared server, tests/conftest.py, is not inherited)."""


def cli(args, cwd, env=None, timeout=CLI_TIMEOUT_S):
    """``trace-realign ARGS`` in its own process; ``env`` adds variables (a None value removes one)."""
    merged = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "trace_realign.flows.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={k: v for k, v in merged.items() if v is not None},
    )


def write_config(tmp: Path, cfg: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("trace-realign: error:"), proc.stderr[-2000:]
    assert needle in err[0], err[0]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("misspelt_key", "unknown setting 'training.lerning_rate'"),
        ("missing_data", "data file not found"),
        ("row_without_chosen", "line 3: missing 'chosen'"),
        ("empty_policy", "policy.md"),
        ("unreachable_judge", "127.0.0.1:9"),
        ("labels_for_another_policy", "labels.jsonl:1: labelled under policy 00000000, but the policy is now"),
        ("server_never_answers", "Prefect's local server did not answer within 0 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_leave_no_result(tmp_path, case, needle):
    cfg = make_config(tmp_path, "http://127.0.0.1:9/v1")
    if case == "misspelt_key":
        cfg["training"]["lerning_rate"] = 0.1
    elif case == "missing_data":
        cfg["data"]["path"] = str(tmp_path / "nope.jsonl")
    elif case == "row_without_chosen":
        lines = Path(cfg["data"]["path"]).read_text().splitlines()
        row = json.loads(lines[2])
        del row["chosen"]
        lines[2] = json.dumps(row)
        Path(cfg["data"]["path"]).write_text("\n".join(lines) + "\n")
    elif case == "empty_policy":
        Path(cfg["policy"]["path"]).write_text("")
    elif case == "labels_for_another_policy":
        labels = tmp_path / "labels.jsonl"
        labels.write_text(json.dumps({"prompt": "p", "response": "r", "compliant": True, "policy_sha256": "0" * 64}) + "\n")
        cfg.setdefault("evaluation", {})["labels_path"] = str(labels)
    # A busy machine that starts Prefect's local server too slowly (here: no time allowed at all).
    env = {**NO_SERVER, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"} if case == "server_never_answers" else None
    proc = cli(["run", "--config", str(write_config(tmp_path, cfg)), "--until", "triage", "--no-progress"], tmp_path, env)
    assert_one_line_error(proc, needle)
    work = Path(cfg["run"]["workdir"])
    results = list((work / "artifacts" / "triage").glob("*.parquet")) if work.exists() else []
    assert not results
    # A later, fixed run is not fooled: the failed stage left nothing in the cache.
    if case == "unreachable_judge":
        assert not list((work / "artifacts" / "verdicts").glob("*.parquet"))


def kill_run_after(config: Path, cwd: Path, server, requests: int, timeout: float = 120) -> None:
    """Start ``run --until judge`` and SIGKILL it (with its process group) once the judge has had
    ``requests`` requests."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trace_realign.flows.cli", "run", "--config", str(config), "--until", "judge", "--no-progress"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and server.stats()["requests"] < requests:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_judging_then_rerun(tmp_path):
    with FakeJudgeProcess(latency=0.25) as server:
        cfg = make_config(tmp_path, server.url)
        cfg["oracle"]["max_concurrency"] = 2
        cfg["data"]["shard_size"] = 24
        config = write_config(tmp_path, cfg)
        kill_run_after(config, tmp_path, server, 12)
        killed_at = server.stats()["requests"]
        assert 12 <= killed_at < 48
        done = cli(["run", "--config", str(config), "--until", "judge", "--no-progress"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = server.stats()
        # Every answer received before the kill was committed: only the requests in flight were asked again.
        assert 48 <= stats["requests"] <= 48 + cfg["oracle"]["max_concurrency"]
    for f in Path(cfg["run"]["workdir"], "artifacts").rglob("*.parquet"):
        pq.read_table(f)  # every Parquet file is whole
    assert not list(Path(cfg["run"]["workdir"], "artifacts").rglob(".tmp-*"))


def test_smoke_config_runs_the_whole_dag_from_the_cli(tmp_path):
    """configs/smoke.yaml end to end (annotations oracle, embedding judge for the generations), on
    Prefect's temporary server as a first run is."""
    work = tmp_path / "smoke"
    # An empty model cache, as on a newcomer's machine: the run prepares tiny-random first.
    env = {**NO_SERVER, "TRACE_REALIGN_HOME": str(tmp_path / "home")}
    proc = cli(["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"run.workdir={work}"], ROOT, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "judge_accuracy" in proc.stdout and "manifest:" in proc.stdout
    manifest = json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())
    assert manifest["status"] == "FINISHED"
    assert manifest["model_preparation"]["seconds"] > 0 and manifest["model_preparation"]["peak_rss_mib"] > 100
    assert "(model prepared)" in proc.stdout
    assert "Downloading artifacts" not in proc.stdout + proc.stderr  # MLflow's bars are not the run's progress
    # The summary's stage table: seconds and peak memory as the manifest has them.
    train = manifest["stages"]["train"]
    assert any(
        line.split()[:4] == ["train", "false", f"{train['seconds']:.1f}", f"{train['peak_rss_mib']:.0f}"] for line in proc.stdout.splitlines()
    ), proc.stdout
    evaluation = manifest["stages"]["evaluate"]
    assert {"tpa_before", "tpa_after", "utility_ratio", "judge_accuracy"} <= set(evaluation["metrics"])
    rows = pq.read_table(evaluation["artifacts"]["generations"]["path"]).to_pylist()
    assert rows and all(r["group"] in ("invert", "punish", "retain") for r in rows)
    # Degeneration, recomputed from the stored generations.
    from trace_realign.core.evaluation import distinct_n, seq_rep_n

    for side, key in (("before", "reference_response"), ("after", "realigned_response")):
        texts = [r[key] for r in rows]
        for name, value in (("seq_rep_4", seq_rep_n(texts, 4)), ("distinct_2", distinct_n(texts, 2))):
            assert evaluation["metrics"].get(f"{name}_{side}") == (None if value is None else pytest.approx(value))
    assert "distinct_2" in proc.stdout
    counts = manifest["stages"]["triage"]["metrics"]
    assert min(counts["triage_invert"], counts["triage_punish"], counts["triage_retain"]) >= 0.15 * counts["triage_total"]
    shown = cli(["show", "--workdir", str(work)], ROOT)
    assert shown.returncode == 0 and manifest["run_id"] in shown.stdout


def test_a_judge_that_answers_nothing_usable_stops_the_run_and_heals_on_the_next(tmp_path):
    """The issue's run: every answer is a reasoning block cut at the token limit (unknown). Before,
    the run trained on nothing and --fresh judge asked nothing; now the run stops with one line
    naming the judge and a raw answer, and once the server is fixed the next plain run asks
    exactly the unknown questions again (a --fresh judge run would ask them whatever their count)."""
    from trace_realign.core.errors import TraceError

    with FakeJudgeServer(shape="[think-cut]") as server:
        cfg = make_config(tmp_path, server.url)
        with pytest.raises(TraceError) as err:
            run_flow(cfg, until="triage")
        message = str(err.value)
        assert message.startswith("judge openai:fake-judge:") and "48 of 48 verdicts unknown (100.0% > 5%)" in message
        assert "raise oracle.max_answer_tokens" in message and "\n" not in message
        assert not list(Path(cfg["run"]["workdir"], "artifacts", "triage").glob("*.parquet"))
        assert requests_made(server) == 48
        server.shape = None  # the server is fixed
        healed = run_flow(cfg, until="triage")
        assert requests_made(server) == 96  # the 48 unknowns asked again, by default
        assert healed["unknown_verdicts"] == {"n": 48, "n_unknown": 0, "unknown_share": 0.0}
        assert healed["stages"]["triage"]["metrics"]["triage_unknown"] == 0
        assert all(cached(run_flow(cfg, until="triage")).values())  # known now: nothing re-asked
        assert requests_made(server) == 96
        refreshed = run_flow(cfg, until="triage", rejudge=True)  # the explicit switch pays again
        assert requests_made(server) == 144 and refreshed["stages"]["judge-0000"]["cached"] is False


def test_fresh_judge_asks_final_unknowns_again(tmp_path):
    """With max_unknown_attempts=1 an unknown is final at once: a plain rerun asks nothing (and stops
    again); --fresh judge asks every unknown again."""
    from trace_realign.core.errors import TraceError

    with FakeJudgeServer(shape="[sentence]") as server:
        cfg = make_config(tmp_path, server.url)
        cfg["oracle"]["max_unknown_attempts"] = 1
        with pytest.raises(TraceError, match="48 of 48 verdicts unknown"):
            run_flow(cfg, until="triage")
        server.shape = None
        with pytest.raises(TraceError, match="48 of 48 verdicts unknown"):  # final: not asked again
            run_flow(cfg, until="triage")
        assert requests_made(server) == 48
        fixed = run_flow(cfg, until="triage", fresh=["judge"])
        assert requests_made(server) == 96 and fixed["unknown_verdicts"]["n_unknown"] == 0
