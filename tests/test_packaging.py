"""The distribution: one namespace (no top-level ``tasks`` or ``flows``), with the shipped configs and
data laid out so that an installed copy runs the demo config from any folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the source (setuptools writes build/ beside the sources), without build
    # isolation: the venv's setuptools builds it, offline. The build takes a few seconds.
    source = tmp_path_factory.mktemp("source") / "trace-realign"
    skip = shutil.ignore_patterns(".git", ".venv", ".trace", "build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, source, ignore=skip)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("trace_realign-*.whl")
    return found


def test_the_wheel_installs_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"trace_realign"}
    second = {n.split("/")[1] for n in names if n.startswith("trace_realign/")}
    assert second == {"core", "tasks", "flows", "configs", "data"}
    assert "trace_realign/core/oracle/base.py" in names and "trace_realign/flows/cli.py" in names
    assert "trace_realign/configs/presets/paper.yaml" in names
    assert {"trace_realign/configs/accelerate/ddp.yaml", "trace_realign/configs/accelerate/fsdp.yaml"} <= set(names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "trace-realign = trace_realign.flows.cli:main" in entry


@pytest.mark.parametrize("config", ["demo", "smoke"])
def test_the_shipped_configs_find_their_files_inside_the_wheel(wheel, tmp_path, config):
    """Each relative input path of a shipped config names a file beside the config in the installed
    layout, so ``trace-realign run --config demo`` needs no checkout."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    configs = tmp_path / "trace_realign" / "configs"
    tree = yaml.safe_load((configs / f"{config}.yaml").read_text())
    paths = [tree["data"]["path"], tree["policy"]["path"]]
    paths += [tree.get("evaluation", {}).get(k) for k in ("prompts_path", "labels_path")]
    for value in filter(None, paths):
        assert (configs / value).is_file(), f"{config}.yaml: {value} is not in the wheel"
    # The known old-policy model is trained from a shipped preference file.
    from trace_realign.core.assets import KNOWN_MODELS

    data = KNOWN_MODELS["smollm2-135m-instruct-old-policy"].source.data
    assert (tmp_path / "trace_realign" / data).is_file()
