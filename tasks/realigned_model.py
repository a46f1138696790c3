"""The code of the MLflow model the train stage logs (MLflow's "models from code": this file is
logged with the model and run when the model is loaded; see :mod:`trace_realign.tasks.mlflow_model`)."""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class RealignedModel(mlflow.pyfunc.PythonModel):
    """The realigned causal LM behind MLflow's pyfunc interface.

    ``predict`` takes prompts (a list of strings; MLflow's signature comes from the type hints) and
    returns one greedy response per prompt (a list of strings), each prompt rendered with the model's
    chat template. ``model_config``: ``base_model`` (the ``model.path`` setting it was trained from),
    ``weights`` (``adapter`` or ``model``), ``dtype``, ``device`` (``auto``: CUDA when visible) and
    ``max_new_tokens``; any of them can be overridden with ``load_model(uri, model_config={...})``.
    """

    def load_context(self, context) -> None:
        """Load the base model and the logged adapter (or the logged full model).

        Raises TraceError when the base model named in ``model_config`` cannot be found offline."""
        from trace_realign.core.assets import resolve_model
        from trace_realign.core.modeling import load_model, load_realigned, load_tokenizer, resolve_device

        cfg = context.model_config
        folder = context.artifacts["weights"]
        device = resolve_device(cfg["device"])
        self.tokenizer = load_tokenizer(folder)
        if cfg["weights"] == "adapter":
            self.model, _ = load_realigned(resolve_model(cfg["base_model"]), adapter=folder, dtype=cfg["dtype"], device=device)
        else:
            self.model = load_model(folder, cfg["dtype"], device)
        self.max_new_tokens = int(cfg["max_new_tokens"])

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        """One greedy response per prompt, in order."""
        from trace_realign.core.evaluation.generation import generate

        return generate(self.model, self.tokenizer, list(model_input), max_new_tokens=self.max_new_tokens, greedy=True)


set_model(RealignedModel())
