"""The realigned model as an MLflow model (pyfunc flavor), logged by the train stage and registered.

What is logged: a pyfunc model whose artifact is the trained output folder (the PEFT adapter with its
tokenizer, a few MB; the whole model after full fine-tuning) and whose ``model_config`` names the base
model by its setting (a known model name such as ``smollm2-135m-instruct``, or a folder). The base
model is referenced, not copied: a 270 MB base in every training run would fill the artifact store
with copies of one file. ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` downloads the
adapter and puts it on the base model, found the way a run finds it (a known name is prepared once,
offline, in the model cache; a folder must exist where the model is loaded). The model's code is
:mod:`trace_realign.tasks.realigned_model`, logged as a file (MLflow's models from code, nothing
pickled); loading it needs this project installed.

Everything goes through the stage's explicit ``MlflowClient``: MLflow's ``log_model`` uses the
process-wide tracking URI and active run, which a Prefect task in a worker thread must not rely on.
"""

from __future__ import annotations

import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc

from trace_realign.tasks import tracking

MODEL_NAME = "realigned_model"
"""The logged model's name (one per training run)."""

MODEL_CODE = Path(__file__).with_name("realigned_model.py")
"""The logged model's code: :class:`trace_realign.tasks.realigned_model.RealignedModel`."""

REQUIREMENTS = ("trace-realign", "mlflow", "torch", "transformers", "peft", "accelerate")
"""What loading the model imports; pinned to the versions that logged it."""


def _requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_realigned_model(
    c, run_id: str, output: Mapping[str, str], base_model: str, dtype: str, params: Mapping[str, Any], max_new_tokens: int = 128
) -> str:
    """Log the train stage's output as an MLflow LoggedModel of run ``run_id``; returns its model id.

    ``output`` is :func:`trace_realign.core.training.save_output`'s ``{"adapter"|"model": folder}``
    (a ``merged`` folder beside the adapter is not logged: the adapter on the base is the same model).
    ``params`` are recorded on the logged model (for instance the base model's fingerprint). The model
    is an output of ``run_id`` and READY when this returns; it is left FAILED if uploading fails.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    weights = "adapter" if "adapter" in output else "model"
    experiment = c.get_run(run_id).info.experiment_id
    logged = c.create_logged_model(
        experiment, name=MODEL_NAME, source_run_id=run_id, params={k: str(v) for k, v in params.items()}, model_type="causal-lm"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # The signature comes from predict's type hints; an input example would make MLflow load the
            # model and generate to check it.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            local = Path(tmp, "model")
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(MODEL_CODE),
                artifacts={"weights": output[weights]},
                model_config={"base_model": base_model, "weights": weights, "dtype": dtype, "device": "auto", "max_new_tokens": max_new_tokens},
                pip_requirements=_requirements(),
                mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id),
            )
            c.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    tracking.log_model_output(c, run_id, logged.model_id)
    return logged.model_id

