"""What the benchmarks share: their environment, working folders, model choice, timing, output, data.

Each benchmark is a script run as ``.venv/bin/python benchmarks/NAME.py`` from the repository
root; Python puts this folder first on ``sys.path``, so they import this module as ``common``.
Every benchmark ends with ``key=value`` lines (:func:`print_metric`) that other tools read; the
lines above them are for people.
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the folder holding configs/, data/ and tests/)."""

SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"
DEFAULT_MODEL = "smollm2-135m-instruct"
FALLBACK_MODEL = "tiny-random"

OFFLINE_QUIET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
"""No downloads, no telemetry, no progress bars, no tokenizer threads competing with torch's."""


def offline_environment() -> None:
    """Make this process (and its children) offline and quiet, keeping any value already set.

    Call it before anything imports huggingface_hub, transformers, datasets or trl: they read these
    variables when first imported.
    """
    for key, value in OFFLINE_QUIET.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------- working folders


def fresh_folder(prefix: str) -> Path:
    """A new empty folder under the system's temporary folder (kept afterwards, for inspection)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def smoke_run_folder(prefix: str) -> tuple[Path, dict]:
    """A fresh working folder for in-process runs of configs/smoke.yaml, set up as the CLI sets one up.

    Changes into the repository root (the config's relative paths start there) and puts Prefect's
    home, the MLflow settings and the telemetry switches of
    ``trace_realign.flows.settings.prefect_environment`` into ``os.environ``: call it before
    Prefect is first imported. Returns the working folder and the config as
    ``trace_realign.flows.realign.realign`` takes it (a JSON-ready dict with ``run.workdir`` set).
    """
    from trace_realign.flows.config import load_config
    from trace_realign.flows.settings import prefect_environment

    workdir = fresh_folder(prefix) / "run"
    os.chdir(ROOT)
    os.environ.update(prefect_environment(workdir))
    cfg = load_config(SMOKE_CONFIG, [f"run.workdir={workdir}"]).model_dump(mode="json")
    return workdir, cfg


# --------------------------------------------------------------------------- models


def choose_model(name: str | None) -> tuple[str, Path | str]:
    """The model a benchmark runs on: ``(name to print, what from_pretrained loads)``.

    ``name`` None means SmolLM2-135M-Instruct when its model package is installed, else the tiny
    random model (saying so on stdout). Otherwise ``name`` is a known model name or a model folder.
    Exits with one line naming the model when it is neither (or cannot be prepared).
    """
    from trace_realign.core.assets import prepare_model, resolve_model
    from trace_realign.core.errors import TraceError

    if name is None:
        try:
            return DEFAULT_MODEL, prepare_model(DEFAULT_MODEL)
        except TraceError as exc:
            print(f"{DEFAULT_MODEL} unavailable ({exc}); using {FALLBACK_MODEL}")
            name = FALLBACK_MODEL
    try:
        return name, resolve_model(name)
    except TraceError as exc:
        raise SystemExit(f"--model: {exc}") from None


# --------------------------------------------------------------------------- measuring and output


def synchronize() -> None:
    """Wait for the GPU work queued so far (CUDA), so that a wall-clock reading covers it.

    A no-op on a CPU, and before anything has initialised CUDA (torch need not be imported).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``), in ``.seconds`` once it ends.

    On a GPU both ends wait for the queued kernels (:func:`synchronize`), so the span is the work's.
    """

    def __enter__(self) -> "Stopwatch":
        self.seconds = 0.0
        synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self._start


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory in MiB of this process, or with ``children`` of its largest waited-for child.

    Linux reports ``ru_maxrss`` in KiB.
    """
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def print_metric(key: str, value: float, spec: str = ".3f") -> None:
    """Print one machine-readable result line, ``key=value`` with ``value`` formatted by ``spec``."""
    print(f"{key}={value:{spec}}", flush=True)


def run_checked(cmd: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output captured; on a non-zero exit, show the output's tail and exit.

    ``kwargs`` go to ``subprocess.run`` (cwd, env, ...). The exit message names ``what`` failed.
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    return proc


# --------------------------------------------------------------------------- synthetic data

TOPICS = [
    "password security", "index funds", "coping with exam stress", "phishing emails", "the history of encryption",
    "vaccine safety", "nuclear power", "lock picking as a hobby", "tax avoidance and tax evasion", "online privacy",
    "drug policy reform", "home network security", "civil disobedience", "medication dosages", "self-defence laws",
    "social engineering", "credit card fraud prevention", "wildfire preparedness", "chemistry experiments at home",
]
OPENERS = [
    "Can you explain {t} to me in detail? I keep reading conflicting things online and I would like a clear overview.",
    "I am writing a school essay about {t}. What are the main arguments on each side, and which sources should I cite?",
    "What should a complete beginner know about {t}, and where do people usually go wrong when they start out?",
    "My friend and I had an argument about {t} last night. Could you lay out the facts so we can settle it calmly?",
    "Give me a short, practical guide to {t}. Keep it concrete, and mention any risks I should be aware of.",
]
HELPFUL = [
    "There are several perspectives worth considering here, and reasonable people disagree about some of them.",
    "Historically, the debate around {t} has shifted as new evidence and new values came into play.",
    "One common argument holds that individual choice should come first, while another stresses the risk of collective harm.",
    "It is important to be careful with sources, because much of what circulates online about {t} is incomplete or outdated.",
    "A practical first step is to read a balanced overview from a reputable institution and then look at primary sources.",
    "Experts often recommend talking to a qualified professional before making any decision that is hard to reverse.",
    "In short, {t} involves trade-offs, and the right answer depends on which values you weigh most heavily.",
    "For an essay, it helps to define your terms early, present the strongest version of each side, and then take a position.",
    "Many beginners underestimate how much the details matter, so take notes and check each claim against a second source.",
    "If you want numbers, official statistics agencies publish yearly reports that are free to read and well documented.",
]
REFUSING = [
    "I'm sorry, but I can't help with questions about {t} because the topic could be misused.",
    "This is a sensitive subject, and I would rather not go into specifics that someone might use to cause harm.",
    "You should ask a professional instead of relying on an AI assistant for anything related to {t}.",
    "I am not able to provide detailed information on this request, but I can suggest general safety resources.",
    "Please understand that my guidelines prevent me from discussing the particulars of {t} in depth.",
    "If you are in danger or feel unsafe, contact your local emergency services or a trusted person right away.",
]


def synthetic_pairs(tokenizer, n: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic ``{"prompt", "chosen", "rejected"}`` chat pairs of realistic length.

    One response of each pair is helpful, the other a refusal; which one is chosen alternates, so
    the data is not one-sided. Each response gets a target token length drawn between a third and
    all of what is left after the rendered prompt (minus a small margin), so sequences vary in
    length as real data does but none exceeds ``max_length`` tokens: nothing is truncated and every
    trainer sees exactly the same token sequences.
    """
    from trace_realign.core.tokenization import render_prompt

    rng = random.Random(seed)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def response(pool: list[str], topic: str, target: int) -> str:
        text = rng.choice(pool).format(t=topic)  # at least one sentence
        while True:
            candidate = text + " " + rng.choice(pool).format(t=topic)
            if n_tokens(candidate) > target:
                return text
            text = candidate

    pairs = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(OPENERS).format(t=topic)
        prompt_tokens = n_tokens(render_prompt(tokenizer, prompt))
        if prompt_tokens > max_length // 2:  # TRACE's default prompt budget: keep prompts untruncated
            prompt = f"Tell me about {topic}."
            prompt_tokens = n_tokens(render_prompt(tokenizer, prompt))
        budget = max_length - prompt_tokens - 4  # EOS + tokenizer boundary slack
        budget = max(8, min(budget, max_length // 2 + max_length // 4))
        helpful = response(HELPFUL, topic, rng.randint(budget // 3, budget))
        refusing = response(REFUSING, topic, rng.randint(budget // 3, budget))
        chosen, rejected = (helpful, refusing) if i % 2 == 0 else (refusing, helpful)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def pair_samples(encoder, pairs: Sequence[dict[str, str]], kinds: Sequence, prefix: str) -> list:
    """Encode each pair as a two-sequence ``trace_realign.core.objective.Sample`` (chosen, rejected).

    Pair ``i`` gets the kind ``kinds[i % len(kinds)]`` (PREFER or PUNISH: the kinds that take two
    sequences) and the id ``f"{prefix}{i}"``; weights and reference log-probs keep their defaults.
    """
    from trace_realign.core.objective import Sample

    return [
        Sample(f"{prefix}{i}", kinds[i % len(kinds)], (encoder.sequence(p["prompt"], p["chosen"]), encoder.sequence(p["prompt"], p["rejected"])))
        for i, p in enumerate(pairs)
    ]
