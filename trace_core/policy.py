"""Policy documents: the new policy `pi_new` the oracle judges against.

A policy is a Markdown or plain-text file with optional YAML front matter::

    ---
    name: harmless-v2
    version: "2"
    description: optional free text
    rules:                 # structured rules for the annotations judge (see trace_realign.core.oracle.annotations)
      critical_categories: [human_trafficking]
    ---
    The policy text the LLM judges receive as their system prompt.

Front matter keys other than ``name``, ``version``, ``description`` and ``rules`` are rejected so a
misspelt key (``verison``, or a rule put at the top level) is caught instead of silently ignored.

The policy's identity everywhere (verdict cache keys, artifact names, run records) is
:attr:`Policy.sha256`, a hash of the canonical content: line endings normalised to LF, trailing
white space removed from every line and from the end of the file. Editing only white space at line
ends or converting a file between CRLF and LF therefore keeps every cached verdict valid, while any
change to a word or a rule invalidates them. A UTF-8 byte-order mark (as Windows editors write)
is not content: the file loads, and hashes, as without it.

:func:`load_policy` reads the file as UTF-8 whatever the platform's default encoding; a file that
is not UTF-8 is one error line naming the file and the offset of the first bad byte, a UTF-16 or
UTF-32 file (a byte-order mark) and a file holding a NUL byte (not a text file) likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trace_realign.core.data import text_sha256
from trace_realign.core.errors import TraceError

FRONT_MATTER_KEYS = ("name", "version", "description", "rules")
_FENCE = "---"


@dataclass(frozen=True)
class Policy:
    """A loaded policy: its text (front matter removed), rules, and canonical content hash."""

    name: str
    version: str | None
    text: str
    rules: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""
    description: str | None = None

    @property
    def short_hash(self) -> str:
        """The first 8 hex digits of :attr:`sha256`, for artifact names such as ``verdicts-<sha8>``."""
        return self.sha256[:8]


def canonical_text(raw: str) -> str:
    """The canonical form hashed for a policy's identity.

    CRLF and lone CR become LF, a leading byte-order mark is dropped, trailing white space is
    stripped from each line, trailing blank lines are dropped, and the result ends in one LF.
    """
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"


def _split_front_matter(canon: str, source: str) -> tuple[dict[str, Any], str]:
    """Split canonical text into (front matter mapping, body); a file without front matter has {}."""
    lines = canon.split("\n")
    if not lines or lines[0] != _FENCE:
        return {}, canon
    try:
        end = lines.index(_FENCE, 1)
    except ValueError:
        raise TraceError(f"{source}: front matter opened with '---' on line 1 is never closed by a '---' line") from None
    block = "\n".join(lines[1:end])
    try:
        meta = yaml.safe_load(block) if block.strip() else {}
    except yaml.YAMLError as exc:
        # The YAML error's own position is relative to the block, which starts on line 2 of the file.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 2})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TraceError(f"{source}: front matter is not valid YAML{where}: {problem}") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{source}: front matter must be a YAML mapping, got {type(meta).__name__}")
    return meta, "\n".join(lines[end + 1 :])


def parse_policy(raw: str, source: str | Path = "<policy>", path: Path | None = None) -> Policy:
    """Build a :class:`Policy` from the file's text; ``source`` names it in error messages."""
    source = str(source)
    canon = canonical_text(raw)
    if not canon.strip():
        raise TraceError(f"{source}: policy file is empty")
    meta, body = _split_front_matter(canon, source)
    unknown = sorted(set(meta) - set(FRONT_MATTER_KEYS))
    if unknown:
        raise TraceError(
            f"{source}: unknown front matter key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(FRONT_MATTER_KEYS)} (annotation rules go under 'rules:')"
        )
    rules = meta.get("rules") or {}
    if not isinstance(rules, dict):
        raise TraceError(f"{source}: front matter 'rules' must be a mapping, got {type(rules).__name__}")
    text = body.strip("\n")
    if not text.strip():
        raise TraceError(f"{source}: policy has front matter but no policy text after it")
    for key in ("name", "version", "description"):
        value = meta.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            raise TraceError(f"{source}: front matter '{key}' must be a string, got {type(value).__name__}")
    default_name = path.stem if path is not None else "policy"
    version = meta.get("version")
    description = meta.get("description")
    return Policy(
        name=str(meta.get("name") or default_name),
        version=None if version is None else str(version),
        text=text,
        rules=rules,
        path=path,
        sha256=text_sha256(canon),
        description=None if description is None else str(description),
    )


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file; every problem a user can cause raises TraceError naming the path."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: policy file not found")
    if not p.is_file():
        raise TraceError(f"{p}: policy path is not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TraceError(f"{p}: cannot read policy file: {exc.strerror}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TraceError(f"{p}: policy file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p}: policy file is not UTF-8 text (byte 0x{data[exc.start]:02X} at offset {exc.start})") from None
    if "\x00" in raw:
        raise TraceError(f"{p}: policy file contains a NUL byte (at offset {data.index(0)}); is it a text file?")
    return parse_policy(raw, source=p, path=p)
