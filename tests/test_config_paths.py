"""Where a config's relative paths point: beside the config file first, then the working folder;
``--set`` paths from the working folder; shipped configs by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from trace_realign.flows.config import load_config
from trace_realign.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, data: str, policy: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(
        f"model: {{path: tiny-random}}\ndata: {{path: {data}}}\npolicy: {{path: {policy}}}\n"
        f"oracle: {{backend: annotations}}\n{extra}"
    )
    return path


def test_paths_beside_the_config_are_found_from_another_folder(tmp_path, monkeypatch):
    config = write_config(tmp_path / "project" / "configs", "../data/pairs.jsonl", "policy.md",
                          "evaluation: {prompts_path: prompts.jsonl}\n")
    (tmp_path / "project" / "data").mkdir()
    (tmp_path / "project" / "data" / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "project" / "configs" / "policy.md").write_text("# p\n")
    (tmp_path / "project" / "configs" / "prompts.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config)
    assert cfg.data.path == str(tmp_path / "project" / "data" / "pairs.jsonl")
    assert cfg.policy.path == str(tmp_path / "project" / "configs" / "policy.md")
    assert cfg.evaluation.prompts_path == str(tmp_path / "project" / "configs" / "prompts.jsonl")
    assert cfg.model.path == "tiny-random"  # a known name, not a file: left as written
    assert cfg.run.workdir == ".trace"  # an output, relative to where the run starts


def test_a_path_only_in_the_working_folder_stays_relative_to_it(tmp_path, monkeypatch):
    config = write_config(tmp_path / "configs", "pairs.jsonl", "policy.md")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "pairs.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config(config)
    assert cfg.data.path == "pairs.jsonl" and cfg.policy.path == "policy.md"


def test_set_paths_are_relative_to_the_working_folder(tmp_path, monkeypatch):
    """A file of the same name beside the config does not capture a path typed on the command line."""
    config = write_config(tmp_path / "configs", "pairs.jsonl", "policy.md")
    (tmp_path / "configs" / "other.jsonl").write_text("{}\n")
    (tmp_path / "configs" / "policy.md").write_text("# p\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, ["data.path=other.jsonl", "policy={path: policy.md}"])
    assert cfg.data.path == "other.jsonl" and cfg.policy.path == "policy.md"


def test_judge_model_folders_beside_the_config_are_found(tmp_path, monkeypatch):
    config = write_config(
        tmp_path / "configs", "pairs.jsonl", "policy.md",
        "evaluation: {judge: {backend: transformers, model_path: judge}}\n",
    )
    (tmp_path / "configs" / "judge").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config(config).evaluation.judge.model_path == str(tmp_path / "configs" / "judge")


@pytest.mark.parametrize("name", ["demo", "smoke", "smoke.yaml"])
def test_shipped_configs_load_by_name_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(name)
    for path in (cfg.data.path, cfg.policy.path):
        assert Path(path).is_absolute() and Path(path).is_file()
    assert Path(cfg.data.path).parent.parent == ROOT / "data"


def test_an_unknown_config_name_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("dmeo")
    assert str(err.value) == "dmeo: config file not found (configs shipped with the package: demo, smoke)"


def test_the_paper_preset_sets_the_authors_settings_over_the_demo_and_set_still_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = load_config("demo")
    assert (demo.training.learning_rate, demo.training.alpha_kl, demo.training.warmup_steps) == (5e-4, 1.0, 8)
    paper = load_config("demo", presets=["paper"])
    t = paper.training
    assert (t.beta, t.alpha_kl, t.learning_rate, t.lr_scheduler, t.warmup_steps, t.num_train_epochs) == (0.3, 0.1, 1e-4, "cosine", 100, 1.0)
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules) == (32, 16, 0.1, ["q_proj", "v_proj"])
    assert t.weight_normalization == "sum" and t.max_steps == -1
    # Settings the preset does not name stay the config's; --set is laid over the preset.
    assert t.max_length == demo.training.max_length and t.per_device_batch_size == demo.training.per_device_batch_size
    assert load_config("demo", ["training.warmup_steps=3"], ["paper"]).training.warmup_steps == 3


def test_a_preset_file_and_an_unknown_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("training: {beta: 0.5}\n")
    assert load_config("smoke", presets=[str(tmp_path / "mine.yaml")]).training.beta == 0.5
    with pytest.raises(ConfigError) as err:
        load_config("smoke", presets=["papr"])
    assert str(err.value) == "--preset papr: no such preset (shipped presets: paper, safety-utility)"
    (tmp_path / "bad.yaml").write_text("training: {betta: 0.5}\n")
    with pytest.raises(ConfigError, match="betta"):
        load_config("smoke", presets=[str(tmp_path / "bad.yaml")])
