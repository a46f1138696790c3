"""Preference pairs: schema, loaders (JSONL, Parquet, CSV, Hugging Face datasets), validation.

A pair is (prompt, chosen, rejected) from the old policy's preference data, with optional
per-response annotations (e.g. PKU-SafeRLHF's safety flag, harm categories and severity) that
the annotation judge reads, and free-form metadata (source, licence, ...).

Prompts are plain text or a conversation (a list of ``{"role", "content"}`` messages). Responses
are text; a conversational response given as a one-message assistant list is accepted too.

``pair_id`` is stable: the first 16 hex digits of sha256 over the canonical JSON of
``[prompt, chosen, rejected]``.

Text from the wild
------------------
Files are read as bytes and decoded as UTF-8 here (never with the platform's default encoding):

- A UTF-8 byte-order mark at the start of a JSONL, JSON or CSV file is not data and is dropped
  (in JSONL at the start of any line, as concatenated exports leave them), so a CSV's first
  header is ``prompt``, not ``\\ufeffprompt``. A UTF-16 or UTF-32 byte-order mark is one line for
  the file: save it as UTF-8.
- Invalid UTF-8 is a problem of the row, not of the file. A JSONL line, a JSON item or a CSV row
  whose bytes do not decode (decoded with ``surrogateescape``; a CSV row may span lines) carries
  the undecodable strings as ``bytes``, as Parquet ``binary`` columns and Parquet strings that are
  not UTF-8 do; a field the pair uses that holds bytes is decoded as UTF-8 or rejects the row
  naming the field and the byte offset. Columns the pair does not use are never looked at.
- NUL characters and lone UTF-16 surrogates (a JSON ``\\ud83d`` escape without its partner) in any
  string of a used field (prompt and its messages, responses, annotations, metadata, keys
  included) reject the row, naming the field and the 1-based character. A NUL in text is
  corruption; a lone surrogate cannot be written as UTF-8, so it would crash ``pair_id``,
  Parquet and tokenization later. A surrogate pair written as two escapes (``\\ud83d\\ude00``) is
  one character (an emoji) and loads intact.
- Line endings: JSONL lines and CSV rows may end in LF or CRLF. Text is never normalised: a
  "\\r\\n" inside a quoted CSV field or a JSON string arrives byte for byte. Control characters
  written raw inside JSON strings are taken literally (``json.loads(strict=False)``).
- A row-level problem (bad text, a JSONL line that is not JSON, a bad typed field) is a
  :class:`DataError` naming ``file:line N``, ``row N`` or ``item N`` and the field, raised in the
  per-row check of :func:`validate_rows`, so ``on_invalid="skip"`` skips and counts it. A
  file-level problem (a JSON document that does not parse, a CSV the ``csv`` module cannot read
  on, an unreadable Parquet file) is one line for the file.

Typed fields
------------
Text formats carry booleans, numbers and objects as strings; they are parsed strictly, never by
truthiness (``bool("False")`` is True):

- boolean (:func:`parse_bool`): ``True``/``False``, the numbers 1/0, and the strings true/false,
  1/0, yes/no in any case; anything else (``None``, "", "maybe", 2) is an error naming the field.
- integer (:func:`parse_int`): an int, an integral float (2.0), or a decimal string ("2",
  "2.0"); a boolean, "high" or 2.5 is an error naming the field.
- an object or list given as a string: JSON, or failing that a Python literal (a pandas CSV
  export writes a dict column as ``{'Violence': False}``).

They apply to the annotation columns, whose known keys are normalised at load time (``is_safe``
and ``refusal`` booleans, ``severity`` an integer >= 0, ``harm_categories`` a mapping of
category name to boolean, where a null value drops that category, ``prompt_tags`` a list of
text; unknown keys pass through), to ``metadata`` (an object; its ``prompt_tags`` as above,
since the annotations judge reads them) and to the PKU-SafeRLHF adapter's columns. A PKU row
without a severity or harm categories gets no such annotation (a rule that needs one gives an
unknown verdict) rather than a made-up 0 or {}.

A CSV cell cannot hold a list, so in CSV a ``prompt`` cell that parses as a JSON list of
messages (each with text ``role`` and ``content``) is read as a conversation; any other text,
including text that starts with "[" but is not such a list, is the prompt as written. Other
formats carry conversations as lists, and their strings are always text.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

from trace_realign.core.errors import DataError

Prompt = str | list[dict[str, str]]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant white space: equal values, equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def text_sha256(value: Any) -> str:
    """sha256 of a string, or of the canonical JSON of anything else (e.g. a message list)."""
    text = value if isinstance(value, str) else canonical_json(value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_pair_id(prompt: Prompt, chosen: str, rejected: str) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``[prompt, chosen, rejected]``.

    Raises :class:`DataError` when the text cannot be UTF-8 (a lone surrogate; the loaders reject
    such rows by name before they get here).
    """
    text = canonical_json([prompt, chosen, rejected])
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"pair text holds a lone surrogate (U+{ord(text[exc.start]):04X}), not encodable as UTF-8") from None
    return hashlib.sha256(data).hexdigest()[:16]


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


_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of an undecodable byte
_INT = re.compile(r"[+-]?[0-9]+(?:\.0*)?", re.ASCII)
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


def _show(value: Any) -> str:
    """A short one-line repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def clean_text(value: Any, where: str, name: str) -> Any:
    """``value`` with text checked: bytes decoded as UTF-8, strings free of NUL and lone surrogates.

    Other values are returned unchanged. Raises :class:`DataError` naming ``where`` and the field
    ``name``: bytes that are not UTF-8 (with the byte offset), a NUL or a lone surrogate (with the
    1-based character).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: '{name}' is not valid UTF-8 (byte 0x{data[exc.start]:02X} at offset {exc.start})") from None
    if isinstance(value, str):
        bad = _BAD_CHAR.search(value)
        if bad is not None:
            char, at = bad.group(), bad.start() + 1
            if char == "\x00":
                raise DataError(f"{where}: '{name}' contains a NUL character (at character {at})")
            raise DataError(
                f"{where}: '{name}' contains a lone surrogate (U+{ord(char):04X} at character {at}, not encodable as UTF-8)"
            )
    return value


def _clean_json(value: Any, where: str, name: str) -> Any:
    """A JSON-like value (annotations, metadata) with every string and key checked by :func:`clean_text`."""
    value = clean_text(value, where, name)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = clean_text(k, where, f"{name} key")
            if not isinstance(key, str):
                raise DataError(f"{where}: '{name}' keys must be text (got {_show(key)})")
            out[key] = _clean_json(v, where, f"{name}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_clean_json(v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise DataError(f"{where}: '{name}' must be a JSON value (text, number, boolean, list or object), got {type(value).__name__}")


def parse_bool(value: Any, where: str, name: str) -> bool:
    """A boolean read strictly: ``True``/``False``, 1/0, or the text true/false, 1/0, yes/no (any case).

    Raises :class:`DataError` naming ``where`` and ``name`` for anything else (``None``, "", "maybe",
    2): a flag is never read by truthiness.
    """
    value = clean_text(value, where, name)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    raise DataError(f"{where}: '{name}' must be a boolean (got {_show(value)}; use true/false, 1/0 or yes/no)")


def parse_int(value: Any, where: str, name: str, *, minimum: int | None = None) -> int:
    """An integer read strictly: an int, an integral float (2.0) or a decimal string ("2", "2.0").

    Raises :class:`DataError` naming ``where`` and ``name`` for a boolean, other text ("high"), a
    fraction, or a value below ``minimum``.
    """
    value = clean_text(value, where, name)
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INT.fullmatch(value.strip()):
        number = int(value.strip().split(".")[0])
    if number is None or (minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise DataError(f"{where}: '{name}' must be an integer{bound} (got {_show(value)})")
    return number


def parse_structured(value: Any, where: str, name: str) -> Any:
    """An object or list that may arrive as text: JSON, or failing that a Python literal.

    Non-text values are returned unchanged. Raises :class:`DataError` naming the field when the
    text is neither.
    """
    value = clean_text(value, where, name)
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        try:  # a pandas CSV export writes a dict column as its Python repr: {'Violence': False}
            return ast.literal_eval(value.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{where}: '{name}' is not valid JSON ({exc.msg})") from None


def _tags(value: Any, where: str, name: str) -> list[str]:
    parsed = clean_text(value, where, name)
    if isinstance(parsed, str):
        try:
            parsed = parse_structured(parsed, where, name)
        except DataError:
            pass
    if isinstance(parsed, (list, tuple)):
        tags = [clean_text(t, where, f"{name}[{i}]") for i, t in enumerate(parsed)]
        if all(isinstance(t, str) for t in tags):
            return tags
    raise DataError(f"{where}: '{name}' must be a list of text tags (got {_show(value)})")


def parse_harm_categories(value: Any, where: str, name: str) -> dict[str, bool]:
    """A ``{category: bool}`` mapping, given as a mapping or as JSON / Python-literal text, its
    values read with :func:`parse_bool`; a null value drops that category. Raises
    :class:`DataError` naming the field (``name.category`` for a bad value)."""
    value = parse_structured(value, where, name)
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: '{name}' must be a mapping of harm category to boolean (got {_show(value)})")
    out = {}
    for k, v in value.items():
        key = clean_text(k, where, f"{name} key")
        if not isinstance(key, str):
            raise DataError(f"{where}: '{name}' keys must be text (got {_show(key)})")
        if v is not None:  # a category this row does not carry (e.g. a struct column filled with nulls)
            out[key] = parse_bool(v, where, f"{name}.{key}")
    return out


def _typed_annotations(ann: Mapping[str, Any], where: str, name: str) -> dict[str, Any]:
    """Annotations with the known keys the annotations judge reads normalised to their types."""
    out = _clean_json(dict(ann), where, name)
    for key in ("is_safe", "refusal"):
        if out.get(key) is not None:
            out[key] = parse_bool(out[key], where, f"{name}.{key}")
    if out.get("severity") is not None:
        out["severity"] = parse_int(out["severity"], where, f"{name}.severity", minimum=0)
    if out.get("harm_categories") is not None:
        out["harm_categories"] = parse_harm_categories(out["harm_categories"], where, f"{name}.harm_categories")
    if out.get("prompt_tags") is not None:
        out["prompt_tags"] = _tags(out["prompt_tags"], where, f"{name}.prompt_tags")
    return out


def _mapping(value: Any, where: str, name: str) -> dict | None:
    """An object column (annotations, metadata), given as a mapping or as JSON / Python-literal text."""
    if value is None:
        return None
    value = parse_structured(value, where, name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: '{name}' must be a mapping")
    return dict(value)


def _annotations(value: Any, where: str, name: str) -> dict | None:
    ann = _mapping(value, where, name)
    return None if ann is None else _typed_annotations(ann, where, name)


def _metadata(value: Any, where: str, name: str) -> dict:
    meta = _clean_json(_mapping(value, where, name) or {}, where, name)
    if meta.get("prompt_tags") is not None:
        meta["prompt_tags"] = _tags(meta["prompt_tags"], where, f"{name}.prompt_tags")
    return meta


def _response_text(value: Any, where: str, name: str) -> str:
    value = clean_text(value, where, name)
    if isinstance(value, list):
        # A conversational response: exactly one assistant message.
        if len(value) == 1 and isinstance(value[0], Mapping) and value[0].get("role") == "assistant":
            value = clean_text(value[0].get("content"), where, f"{name}[0].content")
        else:
            raise DataError(f"{where}: '{name}' must be text or a single assistant message")
    if value is None:
        raise DataError(f"{where}: missing '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty '{name}'")
    return value


def _as_messages(text: str) -> list | None:
    """The message list a CSV prompt cell holds as JSON, or None when it is plain text."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    return value if ok else None


def prompt_value(value: Any, where: str, name: str = "prompt", *, chat_strings: bool = False) -> Prompt:
    """A validated prompt: non-empty text, or a non-empty list of ``{"role", "content"}`` messages.

    Text is checked with :func:`clean_text`. With ``chat_strings`` (CSV), text that parses as a
    JSON list of messages is read as that conversation. Raises :class:`DataError` naming ``where``
    and the field.
    """
    value = clean_text(value, where, name)
    if value is None:
        raise DataError(f"{where}: missing '{name}'")
    if isinstance(value, str):
        messages = _as_messages(value) if chat_strings else None
        if messages is None:
            if not value.strip():
                raise DataError(f"{where}: empty '{name}'")
            return value
        value = messages
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: empty '{name}'")
        messages = []
        for k, m in enumerate(value):
            if isinstance(m, Mapping):
                m = {key: clean_text(m.get(key), where, f"{name}[{k}].{key}") for key in ("role", "content")}
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: prompt message {k} needs string 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: empty '{name}'")
        return messages
    raise DataError(f"{where}: '{name}' must be text or a list of messages, got {type(value).__name__}")


Adapter = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


def validate_rows(
    rows: Iterable[tuple[str, Any]],
    *,
    columns: Mapping[str, str] | None = None,
    on_invalid: Literal["error", "skip"] = "error",
    adapter: Adapter | None = None,
    chat_strings: bool = False,
) -> LoadResult:
    """Build pairs from ``(where, row)`` items, ``where`` naming the file and row for errors.

    ``columns`` maps the schema's names (prompt, chosen, rejected, chosen_annotations,
    rejected_annotations, metadata) to the source's column names. ``adapter(where, row)`` turns a
    source row into a pair row first (e.g. :func:`pku_saferlhf_row`); ``chat_strings`` reads a
    prompt cell holding a JSON message list as a conversation (CSV). A row may be a
    :class:`DataError` a reader met in it (undecodable, not JSON), raised here like any other.
    Invalid rows raise :class:`DataError` naming the row and field, or are counted by reason when
    ``on_invalid="skip"``. Duplicate pairs (same pair_id) are invalid too.
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
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, Mapping):
                raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
            if adapter is not None:
                row = adapter(where, row)
            for key in ("prompt", "chosen", "rejected"):
                if col[key] not in row:
                    raise DataError(f"{where}: missing '{col[key]}'")
            prompt = prompt_value(row[col["prompt"]], where, col["prompt"], chat_strings=chat_strings)
            chosen = _response_text(row[col["chosen"]], where, col["chosen"])
            rejected = _response_text(row[col["rejected"]], where, col["rejected"])
            if chosen == rejected:
                raise DataError(f"{where}: 'chosen' equals 'rejected'")
            pair = PreferencePair.create(
                prompt,
                chosen,
                rejected,
                chosen_annotations=_annotations(row.get(col["chosen_annotations"]), where, col["chosen_annotations"]),
                rejected_annotations=_annotations(
                    row.get(col["rejected_annotations"]), where, col["rejected_annotations"]
                ),
                metadata=_metadata(row.get(col["metadata"]), where, col["metadata"]),
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

_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def _decode_file(data: bytes, path: Path) -> tuple[str, bool]:
    """A text file's bytes as text, and whether it holds undecodable bytes (kept by surrogateescape)."""
    if data.startswith(_WIDE_BOMS):
        raise DataError(f"{path}: the file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8")
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape"), True


def _escaped_to_bytes(value: Any) -> Any:
    """Strings holding surrogate-escaped bytes turned back into those bytes, recursively, so that
    validation names the field that is not UTF-8; other values unchanged."""
    if isinstance(value, str):
        if _ESCAPED_BYTE.search(value):
            try:
                return value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # it also holds a lone surrogate from a JSON escape: rejected as that
                return value
        return value
    if isinstance(value, dict):
        return {_escaped_to_bytes(k): _escaped_to_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped_to_bytes(v) for v in value]
    return value


def _json_line(raw: bytes, where: str) -> Any:
    """One JSONL line's value, or the :class:`DataError` that makes it unusable."""
    try:
        text, escaped = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, escaped = raw.decode("utf-8", "surrogateescape"), True
    try:
        value = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        return DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
    return _escaped_to_bytes(value) if escaped else value


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_WIDE_BOMS):
                raise DataError(f"{path}: the file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8")
            raw = raw.rstrip(b"\r\n")
            if raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if not raw.strip():
                continue
            where = f"{path}:line {lineno}"
            yield where, _json_line(raw, where)


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    text, escaped = _decode_file(path.read_bytes(), path)
    try:
        data = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of pair objects")
    for i, row in enumerate(data, start=1):
        yield f"{path}:item {i}", _escaped_to_bytes(row) if escaped else row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        if f.read(4).startswith(_WIDE_BOMS):
            raise DataError(f"{path}: the file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8")
    # Rows may span lines (quoted newlines), so the whole stream is decoded leniently: undecodable
    # bytes become surrogate escapes, turned back into bytes per row for validation to name.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            bad = [k for k, h in enumerate(header, start=1) if _ESCAPED_BYTE.search(h)]
            if bad:
                name = header[bad[0] - 1].encode("utf-8", "surrogateescape")
                raise DataError(f"{path}: CSV header column {bad[0]} is not valid UTF-8 text ({_show(name)})")
            for i, row in enumerate(reader, start=1):
                yield f"{path}:row {i}", _escaped_to_bytes({k: (v if v != "" else None) for k, v in row.items()})
        except csv.Error as exc:
            raise DataError(f"{path}:line {reader.line_num}: unreadable CSV ({exc})") from None


def _bytes_type(t):
    """``t`` with every string type replaced by the binary type of the same width (for a cast that
    reads strings that are not UTF-8 as bytes)."""
    import pyarrow as pa

    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_dictionary(t):
        return _bytes_type(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = t.value_field.with_type(_bytes_type(t.value_type))
        return pa.list_(item) if pa.types.is_list(t) else pa.large_list(item)
    if pa.types.is_struct(t):
        return pa.struct([t.field(k).with_type(_bytes_type(t.field(k).type)) for k in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_bytes_type(t.key_type), _bytes_type(t.item_type))
    return t


def _decoded(value: Any) -> Any:
    """Bytes that are UTF-8 as text, recursively; bytes that are not stay bytes (validation names them)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    if isinstance(value, tuple):  # map entries
        return tuple(_decoded(v) for v in value)
    return value


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    values = []
    for name, column in zip(table.column_names, table.columns):
        try:
            values.append(column.to_pylist())
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8
            try:
                raw = column.cast(_bytes_type(column.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"{path}: column '{name}' is not valid UTF-8 and cannot be read as bytes ({exc})") from None
            values.append([_decoded(v) for v in raw.to_pylist()])
    for i in range(table.num_rows):
        yield f"{path}:row {i + 1}", {name: column[i] for name, column in zip(table.column_names, values)}


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
    rows, i = iter(ds), 0
    while True:
        i += 1
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # e.g. an Arrow string that is not UTF-8
            raise DataError(f"{name}[{split}]:row {i}: cannot read the row ({type(exc).__name__}: {exc})") from None
        yield f"{name}[{split}]:row {i}", row


_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def _source(
    source: str | Path, format: str | None, split: str, config_name: str | None
) -> tuple[str, Iterator[tuple[str, Any]]]:
    """The resolved format and the reader's ``(where, row)`` items; a row may be a DataError."""
    fmt = (format or "").lower().lstrip(".")
    path = Path(source)
    if fmt == "hf" or (not fmt and not path.is_file()):
        looks_local = path.suffix.lower() in _READERS or str(source).startswith((".", "/", "~"))
        if not fmt and not path.exists() and looks_local:
            raise DataError(f"{source}: data file not found")
        return "hf", _iter_hf(str(source), split, config_name)
    if not path.is_file():
        raise DataError(f"{source}: data file not found")
    fmt = fmt or path.suffix.lower().lstrip(".")
    reader = _READERS.get("." + fmt)
    if reader is None:
        raise DataError(f"{source}: unknown data format (use .jsonl, .json, .csv, .parquet or format: hf)")
    return fmt, reader(path)


def iter_rows(
    source: str | Path, *, format: str | None = None, split: str = "train", config_name: str | None = None
) -> Iterator[tuple[str, Any]]:
    """Rows of a data source with a 'file:row' locator each.

    ``format`` is jsonl, json, csv, parquet or hf; by default it follows the file extension, and a
    source that is not an existing file is read with Hugging Face ``datasets`` (a hub name or a
    ``save_to_disk`` folder). A row that cannot be read (a JSONL line that is not JSON) raises
    :class:`DataError` naming it; text that is not UTF-8 arrives as ``bytes`` (check values with
    :func:`clean_text` or :func:`prompt_value`).
    """
    _, rows = _source(source, format, split, config_name)
    return _raising(rows)


def _raising(rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    for where, row in rows:
        if isinstance(row, DataError):
            raise row
        yield where, row


def load_prompts(source: str | Path) -> tuple[list[Prompt], list[str]]:
    """Held-out prompts for evaluation: (prompts, groups) from a JSONL/JSON/CSV/Parquet file with a
    ``prompt`` column (text or messages) and an optional ``group`` (text; default ``"all"``).

    Every row is checked like a pair's prompt (:func:`prompt_value`); a bad row raises
    :class:`DataError` naming the file and row (prompts are not skipped: the evaluation must be
    comparable between runs).
    """
    prompts: list[Prompt] = []
    groups: list[str] = []
    chat_strings = str(source).lower().endswith(".csv")
    for where, row in iter_rows(source):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
        prompts.append(prompt_value(row.get("prompt"), where, chat_strings=chat_strings))
        group = clean_text(row.get("group", "all"), where, "group")
        if group is None or isinstance(group, (dict, list)) or not str(group).strip():
            raise DataError(f"{where}: 'group' must be a non-empty text")
        groups.append(str(group))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts, groups


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
    authors did (see :func:`pku_saferlhf_row`). Raises :class:`DataError` for a bad file, a bad row
    (unless ``on_invalid="skip"``) or no valid pair at all.
    """
    if adapter not in ("pairs", "pku_saferlhf"):
        raise DataError(f"unknown data adapter '{adapter}' (use pairs or pku_saferlhf)")
    fmt, rows = _source(source, format, split, config_name)
    if limit is not None:
        rows = _take(rows, limit)
    result = validate_rows(
        rows,
        columns=columns,
        on_invalid=on_invalid,
        adapter=pku_saferlhf_row if adapter == "pku_saferlhf" else None,
        chat_strings=fmt == "csv",
    )
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


def _response_id(row: Mapping[str, Any], key: str, where: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        number = parse_int(value, where, key)
    except DataError:
        number = None
    if number not in (0, 1):
        raise DataError(f"{where}: '{key}' must be 0 or 1 (got {_show(value)})")
    return number


def pku_saferlhf_row(where: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """One PKU-SafeRLHF row as a pair row, the way the TRACE authors built theirs.

    chosen = the safe response when exactly one of the two is safe, otherwise the response
    ``safer_response_id`` names. Each response keeps ``is_safe``, ``harm_categories`` and
    ``severity`` as annotations (the latter two only where the row has them); sources and the
    preference ids go to metadata. Flags, ids, severities and harm categories are parsed strictly
    (text such as "False", "1" or a JSON / Python-literal mapping is read as its value). Raises
    :class:`DataError` naming ``where`` and the column.
    """
    missing = [c for c in PKU_COLUMNS if c not in row]
    if missing:
        raise DataError(f"{where}: not a PKU-SafeRLHF row (missing {', '.join(missing)})")
    safe = [parse_bool(row[f"is_response_{i}_safe"], where, f"is_response_{i}_safe") for i in (0, 1)]
    safer = _response_id(row, "safer_response_id", where)
    better = _response_id(row, "better_response_id", where)
    if safe[0] != safe[1]:
        chosen_id = 0 if safe[0] else 1
    elif safer is None:
        raise DataError(f"{where}: 'safer_response_id' must be 0 or 1 (got None)")
    else:
        chosen_id = safer
    rejected_id = 1 - chosen_id

    def ann(i: int) -> dict:
        out: dict[str, Any] = {"is_safe": safe[i]}
        cats = row.get(f"response_{i}_harm_category")
        if cats is not None:
            out["harm_categories"] = parse_harm_categories(cats, where, f"response_{i}_harm_category")
        severity = row.get(f"response_{i}_severity_level")
        if severity is not None:
            out["severity"] = parse_int(severity, where, f"response_{i}_severity_level", minimum=0)
        return out

    def text(key: str) -> Any:
        return _clean_json(row.get(key), where, key)

    meta = {
        "source_format": "pku_saferlhf",
        "prompt_source": text("prompt_source"),
        "chosen_source": text(f"response_{chosen_id}_source"),
        "rejected_source": text(f"response_{rejected_id}_source"),
        "better_response_id": better,
        "safer_response_id": safer,
        "chosen_response_id": chosen_id,
    }
    return {
        "prompt": prompt_value(row["prompt"], where),
        "chosen": _response_text(row[f"response_{chosen_id}"], where, f"response_{chosen_id}"),
        "rejected": _response_text(row[f"response_{rejected_id}"], where, f"response_{rejected_id}"),
        "chosen_annotations": ann(chosen_id),
        "rejected_annotations": ann(rejected_id),
        "metadata": meta,
    }
