"""Preference pairs: schema, loaders (JSONL, Parquet, CSV, Hugging Face datasets), validation.

A pair is (prompt, chosen, rejected) from the old policy's preference data, with optional
per-response annotations (e.g. PKU-SafeRLHF's safety flag, harm categories and severity) that
the annotation judge reads, and free-form metadata (source, licence, ...).

Prompts are plain text or a conversation (a list of ``{"role", "content"}`` messages). Responses
are text; a conversational response given as a one-message assistant list is accepted too.

``pair_id`` is stable: the first 16 hex digits of sha256 over the canonical JSON of
``[prompt, chosen, rejected]``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from trace_core.errors import DataError

Prompt = str | list[dict[str, str]]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant white space: equal values, equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def text_sha256(value: Any) -> str:
    """sha256 of a string, or of the canonical JSON of anything else (e.g. a message list)."""
    text = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_pair_id(prompt: Prompt, chosen: str, rejected: str) -> str:
    return hashlib.sha256(canonical_json([prompt, chosen, rejected]).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PreferencePair:
    pair_id: str
    prompt: Prompt
    chosen: str
    rejected: str
    chosen_annotations: dict[str, Any] | None = None
    rejected_annotations: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        prompt: Prompt,
        chosen: str,
        rejected: str,
        *,
        chosen_annotations: dict | None = None,
        rejected_annotations: dict | None = None,
        metadata: dict | None = None,
    ) -> "PreferencePair":
        return cls(
            make_pair_id(prompt, chosen, rejected),
            prompt,
            chosen,
            rejected,
            chosen_annotations,
            rejected_annotations,
            dict(metadata or {}),
        )

    def to_row(self) -> dict[str, Any]:
        """A flat row for Parquet: structured fields as canonical JSON strings."""
        return {
            "pair_id": self.pair_id,
            "prompt": self.prompt if isinstance(self.prompt, str) else canonical_json(self.prompt),
            "prompt_is_chat": not isinstance(self.prompt, str),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_annotations": None if self.chosen_annotations is None else canonical_json(self.chosen_annotations),
            "rejected_annotations": None
            if self.rejected_annotations is None
            else canonical_json(self.rejected_annotations),
            "metadata": canonical_json(self.metadata),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "PreferencePair":
        """Inverse of :meth:`to_row`."""
        prompt = json.loads(row["prompt"]) if row.get("prompt_is_chat") else row["prompt"]

        def _maybe(v):
            return None if v is None else json.loads(v)

        return cls(
            row["pair_id"],
            prompt,
            row["chosen"],
            row["rejected"],
            _maybe(row.get("chosen_annotations")),
            _maybe(row.get("rejected_annotations")),
            _maybe(row.get("metadata")) or {},
        )


PAIR_COLUMNS = (
    "pair_id",
    "prompt",
    "prompt_is_chat",
    "chosen",
    "rejected",
    "chosen_annotations",
    "rejected_annotations",
    "metadata",
)


def pairs_to_table(pairs: Sequence[PreferencePair]):
    """A pyarrow Table with the pair schema (columns ``PAIR_COLUMNS``)."""
    import pyarrow as pa

    schema = pa.schema(
        [
            ("pair_id", pa.string()),
            ("prompt", pa.string()),
            ("prompt_is_chat", pa.bool_()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("chosen_annotations", pa.string()),
            ("rejected_annotations", pa.string()),
            ("metadata", pa.string()),
        ]
    )
    rows = [p.to_row() for p in pairs]
    return pa.Table.from_pylist(rows, schema=schema)


def table_to_pairs(table) -> list[PreferencePair]:
    return [PreferencePair.from_row(r) for r in table.to_pylist()]


# --------------------------------------------------------------------------- validation


@dataclass
class LoadResult:
    """Pairs that passed validation, and what was skipped (reason -> count) when skipping is on."""

    pairs: list[PreferencePair]
    rows_read: int
    skipped: Counter = field(default_factory=Counter)


def _response_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list):
        # A conversational response: exactly one assistant message.
        if len(value) == 1 and isinstance(value[0], Mapping) and value[0].get("role") == "assistant":
            value = value[0].get("content")
        else:
            raise DataError(f"{where}: '{name}' must be text or a single assistant message")
    if value is None:
        raise DataError(f"{where}: missing '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty '{name}'")
    return value


def _prompt_value(value: Any, where: str) -> Prompt:
    if value is None:
        raise DataError(f"{where}: missing 'prompt'")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty 'prompt'")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: empty 'prompt'")
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: prompt message {k} needs string 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: empty 'prompt'")
        return messages
    raise DataError(f"{where}: 'prompt' must be text or a list of messages, got {type(value).__name__}")


def _annotations(value: Any, where: str, name: str) -> dict | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: '{name}' is not valid JSON ({exc.msg})") from None
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: '{name}' must be a mapping")
    return dict(value)


def validate_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    columns: Mapping[str, str] | None = None,
    on_invalid: Literal["error", "skip"] = "error",
) -> LoadResult:
    """Build pairs from ``(where, row)`` items, ``where`` naming the file and row for errors.

    ``columns`` maps the schema's names (prompt, chosen, rejected, chosen_annotations,
    rejected_annotations, metadata) to the source's column names. Invalid rows raise
    :class:`DataError` naming the row, or are counted by reason when ``on_invalid="skip"``.
    Duplicate pairs (same pair_id) are invalid too.
    """
    col = {k: k for k in ("prompt", "chosen", "rejected", "chosen_annotations", "rejected_annotations", "metadata")}
    col.update(columns or {})
    seen: dict[str, str] = {}
    out: list[PreferencePair] = []
    skipped: Counter = Counter()
    n = 0
    for where, row in rows:
        n += 1
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
            for key in ("prompt", "chosen", "rejected"):
                if col[key] not in row:
                    raise DataError(f"{where}: missing '{col[key]}'")
            prompt = _prompt_value(row[col["prompt"]], where)
            chosen = _response_text(row[col["chosen"]], where, col["chosen"])
            rejected = _response_text(row[col["rejected"]], where, col["rejected"])
            if chosen == rejected:
                raise DataError(f"{where}: 'chosen' equals 'rejected'")
            meta = _annotations(row.get(col["metadata"]), where, col["metadata"]) or {}
            pair = PreferencePair.create(
                prompt,
                chosen,
                rejected,
                chosen_annotations=_annotations(row.get(col["chosen_annotations"]), where, col["chosen_annotations"]),
                rejected_annotations=_annotations(
                    row.get(col["rejected_annotations"]), where, col["rejected_annotations"]
                ),
                metadata=meta,
            )
            if pair.pair_id in seen:
                raise DataError(f"{where}: duplicate pair (same prompt, chosen and rejected as {seen[pair.pair_id]})")
        except DataError as exc:
            if on_invalid == "skip":
                skipped[_reason(str(exc))] += 1
                continue
            raise
        seen[pair.pair_id] = where
        out.append(pair)
    return LoadResult(out, n, skipped)


def _reason(message: str) -> str:
    """The reason part of 'file:row N: reason', for counting skips."""
    return message.split(": ", 1)[-1].split(" (")[0]


# --------------------------------------------------------------------------- readers


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of pair objects")
    for i, row in enumerate(data, start=1):
        yield f"{path}:item {i}", row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for i, row in enumerate(reader, start=1):
            yield f"{path}:row {i}", {k: (v if v != "" else None) for k, v in row.items()}


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {i}", row


def _iter_hf(name: str, split: str, config_name: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        folder = Path(name)
        saved = ("dataset_info.json", "state.json", "dataset_dict.json")
        if folder.is_dir() and any((folder / f).exists() for f in saved):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # network, missing split, unknown data set
        raise DataError(f"{name} (split {split}): cannot load the data set ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(ds, start=1):
        yield f"{name}[{split}]:row {i}", row


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def iter_rows(
    source: str | Path, *, format: str | None = None, split: str = "train", config_name: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Rows of a data source with a 'file:row' locator each.

    ``format`` is jsonl, json, csv, parquet or hf; by default it follows the file extension, and a
    source that is not an existing file is read with Hugging Face ``datasets`` (a hub name or a
    ``save_to_disk`` folder).
    """
    fmt = (format or "").lower().lstrip(".")
    path = Path(source)
    if fmt == "hf" or (not fmt and not path.is_file()):
        looks_local = path.suffix.lower() in _READERS or str(source).startswith((".", "/", "~"))
        if not fmt and not path.exists() and looks_local:
            raise DataError(f"{source}: data file not found")
        return _iter_hf(str(source), split, config_name)
    if not path.is_file():
        raise DataError(f"{source}: data file not found")
    reader = _READERS.get("." + fmt) if fmt else _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{source}: unknown data format (use .jsonl, .json, .csv, .parquet or format: hf)")
    return reader(path)


def load_pairs(
    source: str | Path,
    *,
    format: str | None = None,
    split: str = "train",
    config_name: str | None = None,
    columns: Mapping[str, str] | None = None,
    adapter: Literal["pairs", "pku_saferlhf"] = "pairs",
    on_invalid: Literal["error", "skip"] = "error",
    limit: int | None = None,
) -> LoadResult:
    """Load and validate preference pairs from a file or a Hugging Face data set.

    ``adapter="pku_saferlhf"`` reads the PKU-SafeRLHF schema and builds pairs as the TRACE
    authors did (see :func:`pku_saferlhf_rows`).
    """
    rows = iter_rows(source, format=format, split=split, config_name=config_name)
    if limit is not None:
        rows = _take(rows, limit)
    if adapter == "pku_saferlhf":
        rows = pku_saferlhf_rows(rows)
    elif adapter != "pairs":
        raise DataError(f"unknown data adapter '{adapter}' (use pairs or pku_saferlhf)")
    result = validate_rows(rows, columns=columns, on_invalid=on_invalid)
    if not result.pairs:
        raise DataError(f"{source}: no valid preference pairs ({result.rows_read} rows read)")
    return result


def _take(rows, n):
    for i, item in enumerate(rows):
        if i >= n:
            return
        yield item


# --------------------------------------------------------------------------- PKU-SafeRLHF

PKU_COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "safer_response_id",
)


def pku_saferlhf_rows(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> Iterator[tuple[str, dict]]:
    """Turn PKU-SafeRLHF rows into pair rows the way the TRACE authors built theirs.

    chosen = the safe response when exactly one of the two is safe, otherwise the response
    ``safer_response_id`` names. Each response keeps ``is_safe``, ``harm_categories`` and
    ``severity`` as annotations; sources and the preference ids go to metadata.
    """
    for where, row in rows:
        missing = [c for c in PKU_COLUMNS if c not in row]
        if missing:
            raise DataError(f"{where}: not a PKU-SafeRLHF row (missing {', '.join(missing)})")
        safe = [bool(row["is_response_0_safe"]), bool(row["is_response_1_safe"])]
        if safe[0] != safe[1]:
            chosen_id = 0 if safe[0] else 1
        else:
            try:
                chosen_id = int(row["safer_response_id"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: 'safer_response_id' must be 0 or 1") from None
            if chosen_id not in (0, 1):
                raise DataError(f"{where}: 'safer_response_id' must be 0 or 1")
        rejected_id = 1 - chosen_id

        def ann(i: int) -> dict:
            cats = row.get(f"response_{i}_harm_category") or {}
            return {
                "is_safe": safe[i],
                "harm_categories": {str(k): bool(v) for k, v in dict(cats).items()},
                "severity": int(row.get(f"response_{i}_severity_level") or 0),
            }

        meta = {
            "source_format": "pku_saferlhf",
            "prompt_source": row.get("prompt_source"),
            "chosen_source": row.get(f"response_{chosen_id}_source"),
            "rejected_source": row.get(f"response_{rejected_id}_source"),
            "better_response_id": row.get("better_response_id"),
            "safer_response_id": row.get("safer_response_id"),
            "chosen_response_id": chosen_id,
        }
        yield where, {
            "prompt": row["prompt"],
            "chosen": row[f"response_{chosen_id}"],
            "rejected": row[f"response_{rejected_id}"],
            "chosen_annotations": ann(chosen_id),
            "rejected_annotations": ann(rejected_id),
            "metadata": meta,
        }
