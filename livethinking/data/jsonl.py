"""JSONL files of livestream records and teacher samples: strict loading, atomic writing
(``write_text_atomic`` of `livethinking.data.atomic`: fsynced, renamed into place).

One JSON object per line (blank lines are ignored). Every problem is reported as
``"{path}:{line}: {reason}"`` with a 1-based line number; ``on_error="skip"`` drops the
bad line instead, and the result lists what was dropped and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from livethinking.data.atomic import write_text_atomic
from livethinking.data.records import ROLES, LivestreamRecord, TeacherSample, Turn

__all__ = ["DataError", "LoadResult", "load_json_lines", "load_records", "load_teacher_samples",
           "load_texts", "write_jsonl", "write_text_atomic"]

_RECORD_KEYS = ("id", "product_doc", "question", "history", "reference")
_RECORD_REQUIRED = ("id", "product_doc", "question", "history")
_TEACHER_KEYS = ("id", "response")
_TEXT_KEYS = ("text",)
_ON_ERROR = ("fail", "skip")


class DataError(ValueError):
    """A malformed line of a data file; the message starts with ``"{path}:{line}: "``."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


@dataclass(kw_only=True, slots=True)
class LoadResult:
    """What a loader kept (``items``) and, with ``on_error="skip"``, what it dropped:
    ``(1-based line number, reason)`` pairs."""

    items: list = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


class _Invalid(Exception):
    """Raised by the per-line parsers; carries only the reason."""


def _check_keys(obj: object, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _Invalid(f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in obj:
            raise _Invalid(f"missing key {key!r}")
    return obj


def _text(obj: dict, key: str, *, non_empty: bool) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f"{key!r} must be a string, got {type(value).__name__}")
    if non_empty and not value.strip():
        raise _Invalid(f"{key!r} must be a non-empty string")
    return value


def _parse_turn(item: object, index: int) -> Turn:
    where = f"history[{index}]"
    if not isinstance(item, dict):
        raise _Invalid(f"{where} must be an object, got {type(item).__name__}")
    if set(item) != {"role", "content"}:
        raise _Invalid(f"{where} must have exactly the keys 'role' and 'content', "
                       f"got {sorted(item)}")
    if item["role"] not in ROLES:
        raise _Invalid(f"{where}.role must be one of {ROLES}, got {item['role']!r}")
    if not isinstance(item["content"], str):
        raise _Invalid(f"{where}.content must be a string, "
                       f"got {type(item['content']).__name__}")
    return Turn(role=item["role"], content=item["content"])


def _parse_record(obj: object) -> LivestreamRecord:
    obj = _check_keys(obj, _RECORD_KEYS, _RECORD_REQUIRED)
    history = obj["history"]
    if not isinstance(history, list):
        raise _Invalid(f"'history' must be a list, got {type(history).__name__}")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise _Invalid(f"'reference' must be a string or null, got {type(reference).__name__}")
    return LivestreamRecord(id=_text(obj, "id", non_empty=True),
                            product_doc=_text(obj, "product_doc", non_empty=True),
                            question=_text(obj, "question", non_empty=True),
                            history=[_parse_turn(t, i) for i, t in enumerate(history)],
                            reference=reference)


def _parse_teacher(obj: object) -> TeacherSample:
    obj = _check_keys(obj, _TEACHER_KEYS, _TEACHER_KEYS)
    return TeacherSample(id=_text(obj, "id", non_empty=True),
                         response=_text(obj, "response", non_empty=False))


def _parse_text(obj: object) -> str:
    return _text(_check_keys(obj, _TEXT_KEYS, _TEXT_KEYS), "text", non_empty=True)


def _load(path: str | os.PathLike, parse: Callable[[object], object], on_error: str,
          *, unique_ids: bool) -> LoadResult:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    result = LoadResult()
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    for number, raw in enumerate(raw_lines, start=1):
        try:
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _Invalid(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _Invalid(f"invalid JSON: {e.msg} (column {e.colno})") from None
            item = parse(obj)
            if unique_ids:
                if item.id in seen:
                    raise _Invalid(f"duplicate id {item.id!r} (first on line {seen[item.id]})")
                seen[item.id] = number
        except _Invalid as e:
            if on_error == "fail":
                raise DataError(path, number, str(e)) from None
            result.skipped.append((number, str(e)))
            continue
        result.items.append(item)
    return result


def load_records(path: str | os.PathLike, *, on_error: str = "fail") -> LoadResult:
    """Livestream records (:class:`LivestreamRecord`), ids unique within the file."""
    return _load(path, _parse_record, on_error, unique_ids=True)


def load_json_lines(path: str | os.PathLike, parse: Callable[[object], object], *,
                    on_error: str = "fail") -> LoadResult:
    """Items ``parse(obj)`` of a JSON-lines file, one JSON value a line (blank lines
    skipped); a ``ValueError`` from ``parse``, bad UTF-8 or bad JSON is a
    :class:`DataError` naming ``path:line`` (``on_error="skip"``: the line is skipped and
    listed in ``skipped``)."""
    def checked(obj: object) -> object:
        try:
            return parse(obj)
        except ValueError as e:
            raise _Invalid(str(e)) from None

    return _load(path, checked, on_error, unique_ids=False)


def load_teacher_samples(path: str | os.PathLike, *, on_error: str = "fail") -> LoadResult:
    """Teacher samples (:class:`TeacherSample`); an id may repeat (k samples a prompt)."""
    return _load(path, _parse_teacher, on_error, unique_ids=False)


def load_texts(path: str | os.PathLike, *, on_error: str = "fail") -> LoadResult:
    """Plain texts for language modelling, one ``{"text": "..."}`` (non-empty) a line."""
    return _load(path, _parse_text, on_error, unique_ids=False)


def _as_json(item: object, index: int) -> dict:
    if isinstance(item, LivestreamRecord):
        return item.to_json()
    if isinstance(item, TeacherSample):
        return {"id": item.id, "response": item.response}
    if isinstance(item, dict):
        return item
    raise TypeError(f"write_jsonl: items[{index}] must be a LivestreamRecord, TeacherSample "
                    f"or dict, got {type(item).__name__}")


def write_jsonl(path: str | os.PathLike, items: Iterable[object]) -> None:
    """Write records, teacher samples or dicts, one JSON object a line, atomically."""
    lines = [json.dumps(_as_json(item, i), ensure_ascii=False) + "\n"
             for i, item in enumerate(items)]
    write_text_atomic(path, "".join(lines))
