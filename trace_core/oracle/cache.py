"""The persistent verdict cache: an identical question is paid for once.

A verdict is keyed by (policy sha256, judge identity, sha256 of the prompt -- canonical JSON for a
message list -- and sha256 of the response). Corrections live in their own table under the judge's
correction identity. The store is one SQLite file in WAL mode; every answer is committed as soon as
the judge hands it over (``on_result``), so an interrupt, a crash or SIGKILL loses at most the
requests in flight, and a rerun asks only what is missing.

What is cached: every known verdict, and unknown verdicts that came from an answer (the judge said
something that is neither Yes nor No, refused, or was cut inside its reasoning), with ``attempts``:
how many answers in a row for that question were unknown (1 for a known verdict). Not cached:
unknowns from transient failures (timeouts, 5xx or 429 after retries, connection loss, a rejected
request), marked ``Verdict.transient``; a rerun retries them.

Unknowns heal: :func:`judge_with_cache` asks a cached unknown again while its attempts are below
``max_unknown_attempts`` (the judge config's setting, 3 by default), so a judge or server fixed
after a bad run answers them on the next run; after that many unknown answers it is final and
served from the cache, its reason saying after how many attempts. ``refresh_unknown=True`` (what
``--fresh judge`` passes) asks every cached unknown again regardless of attempts. Known verdicts
stay paid for: only ``refresh_known=True`` asks them again. Corrections are cached only when one
was written.

Schema 2 added ``attempts``; a schema-1 file is migrated in place when opened, keeping every row
(its unknowns count one attempt).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from trace_realign.core.errors import TraceError
from trace_realign.core.data import text_sha256
from trace_realign.core.oracle.base import Judge, JudgeItem, Verdict
from trace_realign.core.policy import Policy
from trace_realign.core.triage import TriagedPair, TriageType, is_low_confidence

T = TypeVar("T")
Key = tuple[str, str]  # (prompt sha256, response sha256)
Progress = Callable[[int, int], None]

_SCHEMA_VERSION = "2"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    policy_sha256 TEXT NOT NULL, judge TEXT NOT NULL, prompt_sha256 TEXT NOT NULL, response_sha256 TEXT NOT NULL,
    compliant INTEGER, confidence REAL, raw TEXT NOT NULL, reason TEXT, created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (policy_sha256, judge, prompt_sha256, response_sha256)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS corrections (
    policy_sha256 TEXT NOT NULL, judge TEXT NOT NULL, prompt_sha256 TEXT NOT NULL, response_sha256 TEXT NOT NULL,
    correction TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (policy_sha256, judge, prompt_sha256, response_sha256)
) WITHOUT ROWID;
"""
# Schema version -> the statements that bring a file of that version to the next one.
_MIGRATIONS = {"1": ("ALTER TABLE verdicts ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",)}
_PUT_VERDICT = """
INSERT INTO verdicts (policy_sha256, judge, prompt_sha256, response_sha256, compliant, confidence, raw, reason, created, attempts)
VALUES (?,?,?,?,?,?,?,?,?,1)
ON CONFLICT (policy_sha256, judge, prompt_sha256, response_sha256) DO UPDATE SET
    compliant=excluded.compliant, confidence=excluded.confidence, raw=excluded.raw, reason=excluded.reason,
    created=excluded.created,
    attempts=CASE WHEN excluded.compliant IS NULL AND verdicts.compliant IS NULL THEN verdicts.attempts + 1 ELSE 1 END
"""
_LOOKUP_CHUNK = 400  # keys per SELECT, under SQLite's bound-parameter limit
DEFAULT_MAX_UNKNOWN_ATTEMPTS = 3


def item_key(item: JudgeItem) -> Key:
    """(sha256 of the prompt, sha256 of the response) for one item."""
    return text_sha256(item.prompt), text_sha256(item.response)


class VerdictCache:
    """SQLite-backed store of verdicts and corrections; safe to share between threads.

    ``hits`` and ``misses`` count lookups over the cache's lifetime (both tables together).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: the openai judge may call back from a helper thread; the lock
            # serialises access.
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process kill (the OS holds the written pages); only a
            # power loss could drop the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] in _MIGRATIONS:
                self._migrate()
            elif row[0] != _SCHEMA_VERSION:
                raise TraceError(f"{self.path}: verdict cache has schema {row[0]}, this version reads {_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise TraceError(f"{self.path}: cannot open the verdict cache: {exc}") from None
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot create the verdict cache: {exc.strerror}") from None

    def _migrate(self) -> None:
        """Bring an older file to this schema in one transaction, keeping every row (a user's paid
        verdicts survive the upgrade); a second process opening it at the same time waits, then
        finds it migrated."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
            while version in _MIGRATIONS:
                for statement in _MIGRATIONS[version]:
                    db.execute(statement)
                version = str(int(version) + 1)
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (version,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if version != _SCHEMA_VERSION:
            raise TraceError(f"{self.path}: verdict cache has schema {version}, this version reads {_SCHEMA_VERSION}")

    # -- verdicts -----------------------------------------------------------------------------

    def get_verdicts(self, policy_sha: str, judge: str, keys: Iterable[Key]) -> dict[Key, Verdict]:
        """Cached verdicts for those of ``keys`` present (counted as hits; the rest as misses)."""
        return {k: v for k, (v, _) in self.get_verdict_attempts(policy_sha, judge, keys).items()}

    def get_verdict_attempts(self, policy_sha: str, judge: str, keys: Iterable[Key]) -> dict[Key, tuple[Verdict, int]]:
        """Cached (verdict, attempts) for those of ``keys`` present; ``attempts`` counts the unknown
        answers in a row for the key (1 for a known verdict)."""
        rows = self._lookup("verdicts", "compliant, confidence, raw, reason, attempts", policy_sha, judge, keys)
        return {
            k: (Verdict(compliant=None if c is None else bool(c), confidence=conf, raw=raw, reason=reason), attempts)
            for k, (c, conf, raw, reason, attempts) in rows.items()
        }

    def put_verdicts(self, policy_sha: str, judge: str, entries: Iterable[tuple[Key, Verdict]]) -> int:
        """Store verdicts in one transaction, skipping transient unknowns; returns how many were stored.

        A stored verdict replaces the key's row; an unknown that replaces an unknown adds one to its
        ``attempts``, anything else sets it to 1.
        """
        now = time.time()
        rows = [
            (policy_sha, judge, p, r, None if v.compliant is None else int(v.compliant), v.confidence, v.raw, v.reason, now)
            for (p, r), v in entries
            if not v.transient
        ]
        self._write(_PUT_VERDICT, rows)
        return len(rows)

    # -- corrections --------------------------------------------------------------------------

    def get_corrections(self, policy_sha: str, judge: str, keys: Iterable[Key]) -> dict[Key, str]:
        rows = self._lookup("corrections", "correction", policy_sha, judge, keys)
        return {k: v[0] for k, v in rows.items()}

    def put_corrections(self, policy_sha: str, judge: str, entries: Iterable[tuple[Key, str | None]]) -> int:
        now = time.time()
        rows = [(policy_sha, judge, p, r, text, now) for (p, r), text in entries if text]
        self._write("INSERT OR REPLACE INTO corrections VALUES (?,?,?,?,?,?)", rows)
        return len(rows)

    # -- plumbing -----------------------------------------------------------------------------

    def count(self, table: str = "verdicts") -> int:
        if table not in ("verdicts", "corrections"):
            raise ValueError(f"no table {table!r}")
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def _lookup(self, table: str, columns: str, policy_sha: str, judge: str, keys: Iterable[Key]) -> dict[Key, tuple]:
        wanted = list(dict.fromkeys(keys))
        found: dict[Key, tuple] = {}
        with self._lock:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                placeholders = ",".join("(?,?)" for _ in chunk)
                params: list[Any] = [policy_sha, judge]
                for p, r in chunk:
                    params += [p, r]
                sql = (
                    f"SELECT prompt_sha256, response_sha256, {columns} FROM {table} "
                    f"WHERE policy_sha256=? AND judge=? AND (prompt_sha256, response_sha256) IN (VALUES {placeholders})"
                )
                for row in self._db.execute(sql, params):
                    found[(row[0], row[1])] = tuple(row[2:])
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def _write(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise TraceError(f"{self.path}: cannot write to the verdict cache: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> VerdictCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lookup_any(get: Callable[[str, list[Key]], dict[Key, T]], identities: Sequence[str], keys: list[Key]) -> dict[Key, T]:
    """``get(identity, keys)`` over ``identities`` in order: each key from the first that has it."""
    found: dict[Key, T] = {}
    for identity in identities:
        rest = [k for k in dict.fromkeys(keys) if k not in found]
        if not rest:
            break
        found.update(get(identity, rest))
    return found


def _with_cache(
    items: Sequence[JudgeItem],
    lookup: Callable[[list[Key]], dict[Key, T]],
    ask: Callable[[list[JudgeItem], Callable[[int, T], None]], list[T]],
    store: Callable[[list[tuple[Key, T]]], None],
    progress: Progress | None,
) -> tuple[list[T], dict[str, int]]:
    """Fill ``items`` from the cache (``lookup`` returns the cached values to serve); ask the judge
    once per missing distinct key, storing each answer as it arrives. Returns (values in item order,
    {hits, misses, requests})."""
    keys = [item_key(it) for it in items]
    cached = lookup(keys)
    first_item: dict[Key, int] = {}
    for i, k in enumerate(keys):
        first_item.setdefault(k, i)
    missing = [k for k in first_item if k not in cached]
    hits = sum(1 for k in keys if k in cached)
    answers: dict[Key, T] = dict(cached)
    total = len(first_item)
    done = total - len(missing)
    if progress is not None:
        progress(done, total)

    def arrived(index: int, value: T) -> None:
        nonlocal done
        key = missing[index]
        answers[key] = value
        store([(key, value)])
        done += 1
        if progress is not None:
            progress(done, total)

    if missing:
        ask([items[first_item[k]] for k in missing], arrived)
    stats = {"hits": hits, "misses": len(items) - hits, "requests": len(missing)}
    return [answers[k] for k in keys], stats


def judge_with_cache(
    judge: Judge,
    items: Sequence[JudgeItem],
    policy: Policy,
    cache: VerdictCache,
    progress: Progress | None = None,
    refresh_unknown: bool = False,
    refresh_known: bool = False,
    max_unknown_attempts: int | None = None,
) -> tuple[list[Verdict], dict[str, int]]:
    """Verdicts for ``items``: cache hits as stored, the rest asked from ``judge`` once per distinct
    (prompt, response), each committed as it arrives (under the judge's identity at that moment).

    A cached unknown is asked again while it was unknown fewer than ``max_unknown_attempts`` times
    in a row (default: the judge config's ``max_unknown_attempts``, else 3), and always with
    ``refresh_unknown``; one that reached the bound is served, its reason ending "(unknown after N
    attempts)". A cached known verdict is served unless ``refresh_known``.

    ``progress(done, total)`` counts distinct (prompt, response) pairs. Returns (verdicts, stats)
    with stats = {hits: items answered from the cache, misses: items not answered from it,
    requests: distinct pairs sent to the judge, reasked: of those, cached unknowns asked again,
    refreshed: of those, cached known verdicts asked again, unknown: unknown verdicts returned,
    unknown_retryable: of those, the ones a later call would ask again (below the attempt bound,
    or transient)}.
    Judges that are not cacheable (the annotations judge) are called directly and count every item
    as a request.
    """
    if max_unknown_attempts is None:
        max_unknown_attempts = getattr(getattr(judge, "config", None), "max_unknown_attempts", DEFAULT_MAX_UNKNOWN_ATTEMPTS)
    if not judge.cacheable:
        verdicts = judge.judge(list(items), policy)
        if progress is not None:
            progress(len(items), len(items))
        stats = {"hits": 0, "misses": len(items), "requests": len(items), "reasked": 0, "refreshed": 0}
    else:
        asked_again = {"reasked": 0, "refreshed": 0}

        def lookup(keys: list[Key]) -> dict[Key, Verdict]:
            found = _lookup_any(
                lambda identity, rest: cache.get_verdict_attempts(policy.sha256, identity, rest), judge.cache_identities, keys
            )
            served: dict[Key, Verdict] = {}
            for key, (verdict, attempts) in found.items():
                if verdict.compliant is not None:
                    if refresh_known:
                        asked_again["refreshed"] += 1
                    else:
                        served[key] = verdict
                elif refresh_unknown or attempts < max_unknown_attempts:
                    asked_again["reasked"] += 1
                else:
                    tries = "attempt" if attempts == 1 else "attempts"
                    served[key] = replace(verdict, reason=f"{verdict.reason or 'unknown'} (unknown after {attempts} {tries})")
            return served

        verdicts, stats = _with_cache(
            items,
            lookup,
            lambda batch, cb: judge.judge(batch, policy, on_result=cb),
            lambda entries: cache.put_verdicts(policy.sha256, judge.identity, entries),
            progress,
        )
        stats.update(asked_again)
        unknown_keys = {item_key(it) for it, v in zip(items, verdicts) if v.compliant is None}
        final = _lookup_any(
            lambda identity, rest: cache.get_verdict_attempts(policy.sha256, identity, rest), judge.cache_identities, unknown_keys
        )
        exhausted = {k for k, (v, attempts) in final.items() if v.compliant is None and attempts >= max_unknown_attempts}
        stats["unknown_retryable"] = sum(
            1 for it, v in zip(items, verdicts) if v.compliant is None and item_key(it) not in exhausted
        )
    stats["unknown"] = sum(v.compliant is None for v in verdicts)
    # A judge that is not cached answers the same again (the annotations judge): nothing to retry.
    stats.setdefault("unknown_retryable", 0)
    return verdicts, stats


def judge_with_fallback(
    judge: Judge,
    items: Sequence[JudgeItem],
    policy: Policy,
    cache: VerdictCache,
    *,
    fallback: Judge | None = None,
    min_confidence: float | None = None,
    progress: Progress | None = None,
    fallback_progress: Progress | None = None,
    refresh_unknown: bool = False,
    refresh_known: bool = False,
) -> tuple[list[Verdict], list[str], dict[str, int]]:
    """Verdicts for ``items`` from ``judge`` (:func:`judge_with_cache`), where every known verdict
    whose confidence is below ``min_confidence``
    (:func:`~trace_realign.core.triage.is_low_confidence`; a verdict without a confidence never is)
    is replaced by ``fallback``'s verdict on the same item, asked through the same cache under the
    fallback's identity (so a rerun asks it nothing). The fallback's verdict is final whatever it
    is: unknown, or itself below the threshold (triage then routes it to UNKNOWN). Unknown verdicts
    of ``judge`` are not passed on: they are asked of ``judge`` again on later runs.

    Returns (verdicts [N], the identity of the judge that gave each [N], stats): ``judge``'s stats
    (:func:`judge_with_cache`) with ``unknown`` counted over the final verdicts and
    ``unknown_retryable`` including the fallback's; with a fallback and a threshold, also
    ``fallback_asked`` (verdicts passed on), ``fallback_changed`` (of those, verdicts the fallback
    turned the other way or left unknown), ``fallback_low_confidence`` (fallback verdicts below the
    threshold too) and the fallback's own ``fallback_hits``, ``fallback_requests``, ``fallback_unknown``.
    Without either, the first judge's verdicts as they are. ``progress`` counts the first judge's
    distinct questions, ``fallback_progress`` the fallback's.
    """
    options = {"refresh_unknown": refresh_unknown, "refresh_known": refresh_known}
    verdicts, stats = judge_with_cache(judge, items, policy, cache, progress, **options)
    judges = [judge.identity] * len(verdicts)
    if fallback is None or min_confidence is None:
        return verdicts, judges, stats
    low = [i for i, v in enumerate(verdicts) if v.known and is_low_confidence(v.confidence, min_confidence)]
    second, second_stats = judge_with_cache(fallback, [items[i] for i in low], policy, cache, fallback_progress, **options)
    first = [verdicts[i] for i in low]
    for i, v in zip(low, second):
        verdicts[i], judges[i] = v, fallback.identity
    stats.update({f"fallback_{k}": second_stats[k] for k in ("hits", "requests", "unknown")})
    stats.update(
        fallback_asked=len(low),
        fallback_changed=sum(a.compliant != b.compliant for a, b in zip(first, second)),
        fallback_low_confidence=sum(is_low_confidence(v.confidence, min_confidence) for v in second),
        unknown=sum(v.compliant is None for v in verdicts),
        unknown_retryable=stats["unknown_retryable"] + second_stats["unknown_retryable"],
    )
    return verdicts, judges, stats


def correct_with_cache(
    judge: Judge,
    items: Sequence[JudgeItem],
    policy: Policy,
    cache: VerdictCache,
    progress: Progress | None = None,
) -> tuple[list[str | None], dict[str, int]]:
    """Oracle corrections for ``items`` (PUNISH pairs: prompt and violating response), cached like
    verdicts under the judge's correction identity. Stats: {hits, misses, requests, failed}."""
    corrections, stats = _with_cache(
        items,
        lambda keys: _lookup_any(
            lambda identity, rest: cache.get_corrections(policy.sha256, identity, rest), judge.correction_cache_identities, keys
        ),
        lambda batch, cb: judge.correct(batch, policy, on_result=cb),
        lambda entries: cache.put_corrections(policy.sha256, judge.correction_identity, entries),
        progress,
    )
    stats["failed"] = sum(c is None for c in corrections)
    return corrections, stats


def correct_punish_pairs(
    triaged: Sequence[TriagedPair],
    judge: Judge,
    policy: Policy,
    cache: VerdictCache,
    progress: Progress | None = None,
) -> tuple[list[TriagedPair], dict[str, int]]:
    """``triaged`` with an oracle-written correction on every PUNISH pair (TRACE's PUNISH with an
    oracle correction ``y_c`` trained over ``y_w``, arXiv 2511.02623, triage stage), through :func:`correct_with_cache`; other pairs
    are returned unchanged. Stats as :func:`correct_with_cache`'s."""
    punish = [i for i, t in enumerate(triaged) if t.type is TriageType.PUNISH]
    items = [JudgeItem(triaged[i].pair.prompt, triaged[i].pair.chosen) for i in punish]
    corrections, stats = correct_with_cache(judge, items, policy, cache, progress)
    out = list(triaged)
    for i, correction in zip(punish, corrections):
        out[i] = replace(out[i], correction=correction)
    return out, stats
