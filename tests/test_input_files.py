"""Every file a setting names keys the stages that read it on its content, not its path.

Each test edits the file in place between two runs with the same config and expects the stage that
reads it to recompute (and its artifact to hold the new content), and the stages before it to stay
cached. The audit test checks the configuration schema itself, so a path setting added later
cannot be forgotten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_pipeline import cached, judge, make_config, run_flow  # noqa: F401  (judge: a fixture)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_editing_the_gold_file_recomputes_the_reference_stage(tmp_path, judge):
    rows = [{"prompt": f"Question {i}", "preferred": f"Helpful answer {i}.", "dispreferred": f"I refuse {i}."} for i in range(4)]
    gold = write_jsonl(tmp_path / "gold.jsonl", rows)
    cfg = make_config(tmp_path, judge.url, weights={"gold_path": str(gold)})
    first = run_flow(cfg, until="reference")
    assert pq.read_table(first["stages"]["reference"]["artifacts"]["gold"]["path"]).num_rows == 4
    # The edit: preferences reversed and one row added, in place.
    edited = [{**r, "preferred": r["dispreferred"], "dispreferred": r["preferred"]} for r in rows]
    write_jsonl(gold, [*edited, {"prompt": "Question 9", "preferred": "Yes, 9.", "dispreferred": "No."}])
    second = run_flow(cfg, until="reference")
    flags = cached(second)
    assert flags["reference"] is False and flags["triage"] is True and flags["load"] is True
    table = pq.read_table(second["stages"]["reference"]["artifacts"]["gold"]["path"]).to_pylist()
    assert len(table) == 5 and {r["preferred"] for r in table} >= {"I refuse 0.", "Yes, 9."}
    assert second["input_files"]["weights.gold_path"]["sha256"] != first["input_files"]["weights.gold_path"]["sha256"]
    # Unchanged content (even rewritten, with a new modification time) is still a cache hit.
    gold.write_bytes(gold.read_bytes())
    assert cached(run_flow(cfg, until="reference"))["reference"] is True


@pytest.mark.parametrize("setting", ["prompts_path", "labels_path"])
def test_editing_an_evaluation_file_recomputes_the_evaluation(tmp_path, judge, setting):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Question 1: tell me about topic 1.", "group": "g"}])
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "p", "response": "r", "compliant": True}])
    cfg = make_config(
        tmp_path, judge.url,
        evaluation={"enabled": True, "prompts_path": str(prompts), "labels_path": str(labels), "max_new_tokens": 4, "max_prompts": 4},
    )
    first = run_flow(cfg)
    target = prompts if setting == "prompts_path" else labels
    if setting == "prompts_path":
        write_jsonl(target, [{"prompt": "Question 1: tell me about topic 1.", "group": "g"}, {"prompt": "Question 2?", "group": "h"}])
    else:
        write_jsonl(target, [{"prompt": "p", "response": "r", "compliant": False}, {"prompt": "q", "response": "s", "compliant": True}])
    second = run_flow(cfg)
    flags = cached(second)
    assert flags["evaluate"] is False and flags["train"] is True
    if setting == "prompts_path":
        assert second["stages"]["evaluate"]["metrics"]["n"] == 2 and first["stages"]["evaluate"]["metrics"]["n"] == 1
    assert second["input_files"][f"evaluation.{setting}"]["sha256"] != first["input_files"][f"evaluation.{setting}"]["sha256"]


def test_replacing_the_judge_model_recomputes_judging(tmp_path, tiny_model_dir):
    """The oracle's model folder (a transformers judge) keys the judge stage on its contents."""
    from trace_realign.core.tiny import build_tiny_model

    judge_dir = tmp_path / "judge-model"
    shutil.copytree(tiny_model_dir, judge_dir)
    cfg = make_config(tmp_path, "http://unused")
    cfg["oracle"] = {"backend": "transformers", "model_path": str(judge_dir), "device": "cpu", "batch_size": 8}
    first = run_flow(cfg, until="judge")
    assert not any(cached(first).values())
    # Another model of the same shape in the same folder (a retrained judge): same path, new weights.
    build_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", judge_dir / "model.safetensors")
    second = run_flow(cfg, until="judge")
    flags = cached(second)
    assert flags["load"] is True and not any(v for k, v in flags.items() if k.startswith("judge-"))
    assert second["input_files"]["oracle.model_path"]["sha256"] != first["input_files"]["oracle.model_path"]["sha256"]


def _string_fields(model_cls, prefix=""):
    """(dotted name, field, owner class) of every text setting in the schema, judge configs included."""
    import typing

    from pydantic import BaseModel

    for name, field in model_cls.model_fields.items():
        dotted = f"{prefix}{name}"
        args = typing.get_args(field.annotation) or (field.annotation,)
        flat = []
        for a in args:
            flat.extend(typing.get_args(a) or (a,))
        models = [a for a in flat if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in models:
            yield from _string_fields(sub, dotted + ".")
        if str in flat:
            yield dotted, field, model_cls


# Text settings that name a file or folder but are keyed otherwise, or are outputs or remote names.
NOT_INPUT_FILES = {
    "run.workdir": "the output folder",
    "model.path": "keyed by the model fingerprint (model_sha256)",
    "data.path": "keyed by the data fingerprint (data_sha256)",
    "policy.path": "keyed by the policy's canonical hash (policy_sha256)",
    "mlflow.tracking_uri": "where results go, not an input",
}


def test_every_setting_that_names_a_file_is_keyed_on_content():
    from trace_realign.flows.config import PipelineConfig

    looks_like_a_path = ("path", "dir", "file", "folder")
    for dotted, field, owner in _string_fields(PipelineConfig):
        leaf = dotted.rsplit(".", 1)[-1]
        marked = isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("input_file")
        is_remote_model = leaf == "model" and owner.__name__ == "OpenAIJudgeConfig"  # a name on a server
        if any(w in leaf for w in looks_like_a_path) or (leaf == "model" and not is_remote_model):
            assert marked or dotted in NOT_INPUT_FILES, f"{dotted} ({owner.__name__}) names a file but is not keyed on its content"


def test_the_hash_memo_rehashes_a_file_edited_behind_a_restored_timestamp(tmp_path):
    import hashlib
    import os

    from trace_realign.tasks.artifacts import HashMemo, folder_sha256

    data = tmp_path / "gold.jsonl"
    data.write_text("one\n")
    memo_file = tmp_path / "memo.json"
    memo = HashMemo(memo_file)
    assert memo.content(data) == hashlib.sha256(b"one\n").hexdigest()
    memo.save()
    again = HashMemo(memo_file)
    assert again.content(data) == hashlib.sha256(b"one\n").hexdigest() and not again._dirty  # remembered, not re-read
    stamp = data.stat()
    data.write_text("two\n")  # same size, and the modification time set back
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert HashMemo(memo_file).content(data) == hashlib.sha256(b"two\n").hexdigest()  # the change time moved
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("a")
    assert HashMemo(None).content(tmp_path / "folder") == folder_sha256(tmp_path / "folder")
