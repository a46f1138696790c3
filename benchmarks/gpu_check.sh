#!/usr/bin/env bash
# The project's GPU check, in one call of at most 10 minutes on a lent GPU machine.
#
#   bash benchmarks/gpu_check.sh prepare     # here, with network to the package index: fills .gpu/
#   bash benchmarks/gpu_check.sh run [DIR]   # on the GPU machine, from the repository root
#
# `prepare` puts into .gpu/ (ignored by git; about 58 MB, carried to the GPU machine) the Python 3.12
# wheels the GPU image lacks (TRL and datasets for the TRL comparison, pydantic for the project's
# settings, pyarrow and fsspec at the versions datasets needs) and the config and tokenizer of the
# prepared SmolLM2-135M-Instruct (its weights are too large to carry).
#
# `run` needs torch with CUDA, transformers, peft and accelerate (the GPU image has them; no vLLM,
# Prefect, MLflow or network there). It installs the wheels into /tmp/gpu-check/site-packages (a
# folder named site-packages: dill, and so datasets, pickles modules elsewhere by value, and fails),
# builds two models with random weights (benchmarks/random_model.py): SmolLM2-135M's architecture and SmolLM2-1.7B's
# (hidden 2048, 24 layers, 32 heads), and runs, each under the time left of a 540 s budget:
#   1. benchmarks/impact_weights.py on CUDA in bf16, 135M: the project's impact scores vs the
#      authors' per-pair backward (target impact_speedup >= 3) and their agreement;
#   2. benchmarks/train_step.py on CUDA with bf16 autocast, 135M: TRACE's trainer vs TRL's
#      DPOTrainer, tokens/s and peak GPU memory;
#   3. and 4. the same two on the 1.7B architecture.
# Each step's output goes to DIR/<step>.log; every key=value result line, under its step's name, to
# DIR/gpu_check.txt (the one file of figures). DIR defaults to $OUT, else gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-}
SRC=.gpu/smollm2-135m-instruct
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 pyarrow==25.0.1 fsspec==2026.9.0)

prepare() {
    set -e
    mkdir -p .gpu/whl "$SRC"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl "${WHEELS[@]}"
    local model
    model=$(.venv/bin/python -c "from trace_realign.core.assets import prepare_model; print(prepare_model('smollm2-135m-instruct'))")
    for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
        [ -f "$model/$f" ] && cp "$model/$f" "$SRC/"
    done
    du -sh .gpu
}

run() {
    # PYTHON, GPU_CHECK_DEVICE and GPU_CHECK_BUDGET (seconds) change the interpreter, the device and
    # the time budget, for a dry run of the plumbing on a machine without a GPU.
    local out=${1:-${OUT:-gpu-check-out}} start=$SECONDS budget=${GPU_CHECK_BUDGET:-540} dev=${GPU_CHECK_DEVICE:-cuda}
    local py=${PYTHON:-python3}
    mkdir -p "$out"
    local figures="$out/gpu_check.txt"
    export PYTHONUNBUFFERED=1
    [ -d .gpu/whl ] && [ -f "$SRC/config.json" ] || { echo "gpu_check: .gpu/ is missing; run 'bash benchmarks/gpu_check.sh prepare' here first"; exit 2; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check/site-packages .gpu/whl/*.whl || exit 3
    # The project's namespace without installing it: trace_realign.core is trace_core/.
    mkdir -p /tmp/gpu-check/site-packages/trace_realign && ln -sfn "$PWD/trace_core" /tmp/gpu-check/site-packages/trace_realign/core
    export PYTHONPATH=/tmp/gpu-check/site-packages
    {
        echo "# benchmarks/gpu_check.sh, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/# gpu: /'
        "$py" -c "import torch, transformers, peft, accelerate, trl; print(f'# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, trl {trl.__version__}')"
    } >"$figures" 2>&1
    cat "$figures"
    "$py" benchmarks/random_model.py --from "$SRC" --out /tmp/models/smollm2-135m-arch >"$out/models.log" 2>&1 &&
    "$py" benchmarks/random_model.py --from "$SRC" --out /tmp/models/smollm2-1.7b-arch \
        --hidden-size 2048 --intermediate-size 8192 --layers 24 --heads 32 --kv-heads 32 >>"$out/models.log" 2>&1 ||
        { tail -20 "$out/models.log"; exit 4; }

    step() {  # step NAME MIN_SECONDS SCRIPT ARGS...: run it under the time left, keep its figures
        local name=$1 need=$2 left=$((budget - (SECONDS - start)))
        shift 2
        if [ "$left" -lt "$need" ]; then
            echo "[$name] skipped: ${left} s left of the ${budget} s budget, it needs about ${need} s" | tee -a "$figures"
            return
        fi
        echo "[$name] python3 $* (at most ${left} s)" | tee -a "$figures"
        timeout -k 10 "$left" "$py" "$@" >"$out/$name.log" 2>&1
        local rc=$?
        grep -E '^[a-z_0-9]+=' "$out/$name.log" | sed "s/^/$name./" | tee -a "$figures"
        [ "$rc" -eq 0 ] || { echo "[$name] exit $rc; its last lines:"; tail -15 "$out/$name.log"; } | tee -a "$figures"
    }
    local m135=/tmp/models/smollm2-135m-arch m17=/tmp/models/smollm2-1.7b-arch
    step impact_135m 60 benchmarks/impact_weights.py --model $m135 --device $dev --dtype bfloat16 --n 256 --gold 64 --batch-size 8 --max-length 256
    step train_135m 120 benchmarks/train_step.py --model $m135 --device $dev --bf16 --steps 20 --warmup 3 --batch-size 8 --max-length 256 --pairs 184 --repeats 1
    step impact_1.7b 90 benchmarks/impact_weights.py --model $m17 --device $dev --dtype bfloat16 --n 128 --gold 32 --batch-size 8 --max-length 256
    step train_1.7b 120 benchmarks/train_step.py --model $m17 --device $dev --bf16 --steps 10 --warmup 2 --batch-size 8 --max-length 256 --pairs 96 --repeats 1
    echo "# done in $((SECONDS - start)) s" | tee -a "$figures"
}

case "$MODE" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh prepare|run [DIR]"; exit 2 ;;
esac
