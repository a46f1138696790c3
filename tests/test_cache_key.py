"""Stage cache keys: parameters and code decide a stage's result, the run context does not."""

from types import SimpleNamespace

from trace_realign.tasks import common


def _ctx():
    return SimpleNamespace(task=SimpleNamespace(name="stage", fn=common.stage_cache_key))


def test_cache_key_follows_parameters_and_code_not_the_run_context(monkeypatch):
    key = common.stage_cache_key(_ctx(), {"p": 1, "run": {"workdir": "a"}})
    assert key.startswith("stage-")
    assert common.stage_cache_key(_ctx(), {"p": 1, "run": {"workdir": "b"}}) == key
    assert common.stage_cache_key(_ctx(), {"p": 2, "run": {"workdir": "a"}}) != key
    # Editing the library (or a task helper) changes what a stage computes: its key changes.
    monkeypatch.setattr(common, "code_fingerprint", lambda: "edited")
    assert common.stage_cache_key(_ctx(), {"p": 1, "run": {"workdir": "a"}}) != key


def test_tree_hash_sees_every_python_file(tmp_path):
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    (lib / "a.py").write_text("x = 1\n")
    (lib / "sub" / "b.py").write_text("y = 2\n")
    (lib / "notes.txt").write_text("not code")
    first = common.tree_sha256([lib])
    (lib / "notes.txt").write_text("changed, still not code")
    assert common.tree_sha256([lib]) == first
    (lib / "sub" / "b.py").write_text("y = 3\n")
    assert common.tree_sha256([lib]) != first
    (lib / "sub" / "b.py").write_text("y = 2\n")
    (lib / "sub" / "b.py").rename(lib / "sub" / "c.py")  # same bytes, another module
    assert common.tree_sha256([lib]) != first
