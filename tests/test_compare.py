"""The comparison table (means and Student-t intervals over seeds) and `trace-realign compare` end
to end on the smoke configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, assert_one_line_error, cli
from trace_realign.core.evaluation.comparison import (
    STARTING_MODEL,
    Variant,
    comparison_rows,
    compared_metrics,
    interval,
    markdown_table,
)


def test_interval_matches_hand_computed_t_interval():
    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.30265 (tables) -> half-width 4.3027 / sqrt(3).
    i = interval([1.0, 2.0, 3.0])
    assert i.mean == 2.0 and i.n == 3
    assert i.half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    # Two seeds: [10, 20]: s = sqrt(50), t_{0.975, 1} = 12.706204736174705 -> 12.7062 * 5.
    assert interval([10.0, 20.0]).half_width == pytest.approx(12.706204736174705 * 5.0, rel=1e-9)
    one = interval([7.5])
    assert (one.mean, one.half_width, one.n) == (7.5, None, 1) and one.text() == "7.50"
    with pytest.raises(ValueError):
        interval([])


def test_interval_agrees_with_scipy_on_random_samples():
    import random

    from scipy import stats

    rng = random.Random(3)
    for n in (2, 3, 5, 9):
        values = [rng.gauss(50, 10) for _ in range(n)]
        lo, hi = stats.t.interval(0.95, n - 1, loc=sum(values) / n, scale=stats.sem(values))
        i = interval(values)
        assert i.mean - i.half_width == pytest.approx(lo) and i.mean + i.half_width == pytest.approx(hi)


def test_columns_are_before_after_metrics_and_paired_ones():
    names = [
        "tpa_before", "tpa_after", "tpa_after/invert", "n_unknown_before", "n_unknown_after", "labelled_tpa_after",
        "labelled_coverage_after", "utility_ratio", "judge_accuracy", "asr_screenwriter_after", "win_rate",
        "generation_seconds_reference", "asr_screenwriter_n_unknown_after", "lm_eval_mc_acc_after", "lm_eval_mc_acc_stderr_after",
        "h2h_win_rate", "win_n",
    ]
    assert compared_metrics(names) == ["tpa", "labelled_tpa", "utility_ratio", "win_rate", "h2h_win_rate", "asr_screenwriter", "lm_eval_mc_acc"]


def _variant(method, seed, tpa_after, utility, samples=10, steps=4, before=20.0):
    return Variant(
        method, None, seed,
        {"tpa_before": before, "tpa_after": tpa_after, "tpa_before/invert": 0.0, "tpa_after/invert": tpa_after / 2, "utility_ratio": utility},
        samples, steps,
    )


def test_rows_hold_the_starting_model_then_each_method_over_its_seeds():
    variants = [
        _variant("trace", 0, 60.0, 1.0, samples=12), _variant("trace", 1, 70.0, 1.2, samples=12),
        _variant("naive_relabel_dpo", 0, 40.0, 0.9, samples=8), _variant("naive_relabel_dpo", 1, 50.0, 1.1, samples=8),
    ]
    columns, rows = comparison_rows(variants)
    assert columns == ["tpa", "utility_ratio"]
    start, trace, naive = rows
    assert start.method == STARTING_MODEL and start.metrics["tpa"].mean == 20.0 and start.metrics["tpa"].half_width == 0.0
    assert "utility_ratio" not in start.metrics  # a paired metric has no before value
    assert trace.method == "trace" and trace.seeds == [0, 1] and trace.samples == [12, 12] and trace.steps == [4, 4]
    assert trace.metrics["tpa"].mean == 65.0
    assert trace.metrics["tpa"].half_width == pytest.approx(12.706204736174705 * math.sqrt(50) / math.sqrt(2))
    assert naive.metrics["utility_ratio"].mean == pytest.approx(1.0)
    assert trace.by_group["invert"].mean == 32.5 and start.by_group["invert"].mean == 0.0
    table = markdown_table(columns, rows, "Equal data: same pairs.")
    lines = table.splitlines()
    assert lines[0] == "| method | seeds | tpa | utility_ratio | samples | steps |"
    assert lines[3].startswith("| trace | 2 | 65.00 ± 63.53 | 1.100 ± 1.271 | 12 | 4 |")
    assert lines[-1] == "Equal data: same pairs."
    with pytest.raises(ValueError):
        comparison_rows([])


def test_unknown_method_fails_with_one_line_before_any_work(tmp_path):
    proc = cli(
        ["compare", "--config", "smoke", "--methods", "trace,dpo_gold", "--set", f"run.workdir={tmp_path / 'w'}"], tmp_path, timeout=60
    )
    assert_one_line_error(proc, "--methods: unknown method 'dpo_gold'")
    assert not (tmp_path / "w").exists()


def test_compare_on_the_smoke_config_shares_stages_and_logs_one_table(tmp_path):
    """Two methods on configs/smoke.yaml: the second trains on the same cached triage, for the same
    optimizer steps; the comparison's MLflow run is the parent of both realign runs and holds the
    table, the plots and the means."""
    from mlflow import MlflowClient

    work = tmp_path / "cmp"
    proc = cli(
        [
            "compare", "--config", "smoke", "--methods", "trace,naive_relabel_dpo", "--set", f"run.workdir={work}", "--no-progress",
            "--set", "evaluation.lm_eval.tasks=[trace_mini_mc]", "--set", "evaluation.lm_eval.limit=4",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm_eval_trace_mini_mc_acc" in proc.stdout  # the harness's accuracy is a column
    out = json.loads(Path(proc.stdout.split("comparison:")[1].split()[0]).read_text())
    assert [r["method"] for r in out["table"]["rows"]] == [STARTING_MODEL, "trace", "naive_relabel_dpo"]
    assert "| trace | 1 |" in proc.stdout and "Equal data: every method trained on the same" in proc.stdout
    manifests = [json.loads(Path(v["manifest"]).read_text()) for v in out["variants"]]
    first, second = manifests
    assert [m["config"]["training"]["method"] for m in manifests] == ["trace", "naive_relabel_dpo"]
    for stage in ("load", "judge-0000", "triage"):
        assert second["stages"][stage]["cached"], stage
    assert not second["stages"]["train"]["cached"]
    steps = [m["stages"]["train"]["metrics"]["global_step"] for m in manifests]
    assert steps[0] == steps[1] == out["steps"] == 6  # smoke's max_steps
    samples = [m["stages"]["train"]["metrics"]["samples"] for m in manifests]
    assert samples[1] < samples[0]  # naive relabel drops PUNISH pairs and has no RETAIN term
    # Each row's numbers are the variant's own evaluate metrics.
    rows = {r["method"]: r for r in out["table"]["rows"]}
    for m in manifests:
        after = m["stages"]["evaluate"]["metrics"]["tpa_after"]
        assert rows[m["config"]["training"]["method"]]["metrics"]["tpa"]["mean"] == pytest.approx(after)
    assert rows[STARTING_MODEL]["metrics"]["tpa"]["mean"] == pytest.approx(first["stages"]["evaluate"]["metrics"]["tpa_before"])
    c = MlflowClient(tracking_uri=f"sqlite:///{work.resolve() / 'mlflow.db'}")
    parent = c.get_run(out["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trace.tpa"] == pytest.approx(rows["trace"]["metrics"]["tpa"]["mean"])
    for v in out["variants"]:
        child = c.get_run(v["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == out["run_id"] and child.info.status == "FINISHED"
    logged = {a.path for a in c.list_artifacts(out["run_id"], "plots")} | {a.path for a in c.list_artifacts(out["run_id"], "comparison")}
    assert {"plots/compare_tpa.png", "plots/compare_tpa_by_group.png"} <= logged
    assert any(p.startswith("comparison/comparison-") and p.endswith(".md") for p in logged)
    assert parent.data.tags["mlflow.note.content"].startswith("| method |")
    # Head to head: naive_relabel_dpo's answers judged against trace's, in both orders, in a stage
    # run under the comparison.
    h2h = rows["naive_relabel_dpo"]["metrics"]
    assert {"h2h_win_rate", "h2h_tie_rate", "h2h_loss_rate"} <= set(h2h) and "h2h_win_rate" not in rows["trace"]["metrics"]
    assert sum(h2h[k]["mean"] for k in ("h2h_win_rate", "h2h_tie_rate", "h2h_loss_rate")) == pytest.approx(100.0)
    stage_runs = c.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out['run_id']}'")
    assert {r.data.tags.get("stage") for r in stage_runs} == {None, "head-to-head"}
    assert "against trace's on the same prompts" in proc.stdout


def test_close_dead_runs_spares_this_process_runs(tmp_path):
    """A comparison keeps its own run open while its realign runs start: those close RUNNING runs
    of dead processes in the folder, never the live comparison's (this process's) run."""
    from trace_realign.tasks import tracking

    work = tmp_path / "w"
    work.mkdir()
    uri = tracking.tracking_uri(work, None)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "trace-realign", work)
    mine = c.create_run(exp, tags=tracking.process_tags(work)).info.run_id
    dead = c.create_run(exp, tags={**tracking.process_tags(work), "trace.pid": str(2**22 + 7)}).info.run_id
    assert tracking.close_dead_runs(c, exp, work) == [dead]
    assert c.get_run(mine).info.status == "RUNNING" and c.get_run(dead).info.status == "KILLED"


def test_compare_over_noise_rates_redoes_triage_per_rate_and_leaves_gold_dpo_clean(tmp_path):
    """--noise-rates: one row per method and rate; the judge's verdicts are shared (no judge stage
    reruns), triage is redone once per rate and shared by the methods at that rate (rate 0 is the
    run without noise, so a plain comparison's stages serve it), and gold_dpo trains on the same
    gold-labelled samples whatever the noise."""
    work = tmp_path / "noise"
    proc = cli(
        [
            "compare", "--config", "smoke", "--methods", "trace,gold_dpo", "--noise-rates", "0,0.5",
            "--set", f"run.workdir={work}", "--no-progress",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(Path(proc.stdout.split("comparison:")[1].split()[0]).read_text())
    assert [(r["method"], r["noise_rate"]) for r in out["table"]["rows"]] == [
        (STARTING_MODEL, None), ("trace", 0.0), ("gold_dpo", 0.0), ("trace", 0.5), ("gold_dpo", 0.5)
    ]
    assert "| method | oracle noise |" in proc.stdout
    m = [json.loads(Path(v["manifest"]).read_text()) for v in out["variants"]]
    assert [(x["config"]["triage"]["noise"] or {}).get("rate") for x in m] == [None, None, 0.5, 0.5]
    assert all(x["stages"]["judge-0000"]["cached"] for x in m[1:])
    assert [x["stages"]["triage"]["cached"] for x in m] == [False, True, False, True]
    triage = [x["stages"]["triage"]["metrics"] for x in m]
    assert triage[0].get("noise_pairs", 0) == 0 and triage[2]["noise_pairs"] == round(0.5 * triage[2]["triage_total"])
    samples = [x["stages"]["train"]["metrics"]["samples"] for x in m]
    assert samples[1] == samples[3]  # gold_dpo: the gold labels never see the noise
    assert triage[0]["gold_total"] == triage[2]["gold_total"]


def test_bad_noise_rates_fail_with_one_line(tmp_path):
    for rates, needle in (("0,1.5", "--noise-rates: 1.5 is not a share in [0, 1]"), ("0,x", "--noise-rates: '0,x' is not")):
        proc = cli(["compare", "--config", "smoke", "--methods", "trace", "--noise-rates", rates], tmp_path, timeout=60)
        assert_one_line_error(proc, needle)


@pytest.mark.parametrize("command", [["run"], ["compare", "--methods", "trace,npo", "--noise-rates", "0,0.1"]])
def test_prefect_is_not_imported_before_the_working_folder_environment(tmp_path, command):
    """Prefect reads its settings (home, local server start-up timeout) when first imported: the CLI
    checks its arguments and config without importing it, and sets the working folder's
    environment first. (A compare once imported it while checking --methods, and its local server
    then had Prefect's default 20 s to start, which a busy machine missed.)"""
    import subprocess
    import sys

    argv = [command[0], "--config", "smoke", "--set", f"run.workdir={tmp_path / 'w'}", *command[1:]]
    code = (
        "import sys\n"
        "import trace_realign.flows.cli as cli\n"
        "def env(*a, **k):\n"
        "    print('prefect imported:', 'prefect' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "cli.prefect_environment = env\n"
        f"cli.main({argv!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "prefect imported: False"
