"""Same inputs, same bytes: artifacts named by content do not depend on the process (PYTHONHASHSEED)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, cli


def adapter_files(out: Path, seed: str, tiny_model_dir: Path) -> dict[str, bytes]:
    code = textwrap.dedent(
        f"""
        from trace_realign.core.config import LoraConfig
        from trace_realign.core.modeling import add_lora, load_model, save_adapter
        model = add_lora(load_model({str(tiny_model_dir)!r}), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        save_adapter(model, {str(out)!r})
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_an_adapter_saved_under_two_hash_seeds_is_the_same_bytes(tmp_path, tiny_model_dir):
    one = adapter_files(tmp_path / "one", "1", tiny_model_dir)
    two = adapter_files(tmp_path / "two", "2", tiny_model_dir)
    assert one.keys() == two.keys() and "adapter_config.json" in one
    assert one == two
    config = json.loads(one["adapter_config.json"])
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def manifest_of(tmp_path: Path, seed: str) -> dict:
    work = tmp_path / f"work-{seed}"
    proc = cli(
        ["run", "--config", str(ROOT / "configs" / "smoke.yaml"), "--no-progress", "--set", f"run.workdir={work}",
         "--set", "training.max_steps=2", "--set", "evaluation.max_prompts=3"],
        ROOT, env={"PYTHONHASHSEED": seed},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(proc.stdout.split("manifest:")[1].split()[0]).read_text())


def artifacts(manifest: dict) -> dict[str, tuple[str, str]]:
    """{stage/name[i]: (file or folder name, sha256)} of every artifact of a run."""
    out = {}
    for stage, info in manifest["stages"].items():
        for name, art in info["artifacts"].items():
            for i, a in enumerate(art if isinstance(art, list) else [art]):
                out[f"{stage}/{name}[{i}]"] = (Path(a["path"]).name, a["sha256"])
    return out


@pytest.mark.slow
def test_the_smoke_run_under_two_hash_seeds_names_every_artifact_the_same(tmp_path):
    one, two = artifacts(manifest_of(tmp_path, "1")), artifacts(manifest_of(tmp_path, "2"))
    assert len(one) > 10
    assert one == two, {k: (one.get(k), two.get(k)) for k in set(one) | set(two) if one.get(k) != two.get(k)}
