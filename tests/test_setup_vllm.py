"""How the vLLM venv is made: CI runs README's test command, which makes it; setup.sh's options."""

from __future__ import annotations

import re
import subprocess

from tests.vllm_venv import ROOT


def test_ci_runs_readmes_test_command_and_it_makes_the_vllm_venv():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first, test = re.findall(r"```bash\n(.+?)\n```", readme)[:2]
    assert "--vllm" not in first  # the first command stays light
    assert test == "bash scripts/setup.sh --vllm && .venv/bin/python -m pytest -q"
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci[-1] == test  # before it, only the system install of PostgreSQL for tests/test_postgres.py
    assert test not in ci[:-1] and all("pytest" not in line for line in ci[:-1])


def test_setup_rejects_an_unknown_option_before_installing_anything(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--vllmm"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "scripts/setup.sh: unknown option '--vllmm' (the only option is --vllm)"
