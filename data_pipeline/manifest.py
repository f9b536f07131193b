"""Strict JSONL manifest parsing.

One sample per line::

    {"video": "clips/a.mp4", "question": "How many?", "answer": "3",
     "id": "a", "task": "count", "start": 1.5, "end": 4.0,
     "turns": [{"question": "Then?", "answer": "left"}], "meta": {"source": "cam1"}}

Required: ``video`` (str; relative paths are resolved against the manifest's folder),
``question`` (str), ``answer`` (str). Optional: ``id`` (str or int; default: the 1-based line
number), ``task`` (str), ``start``/``end`` (clip bounds in seconds from the first frame),
``turns`` (follow-up question/answer pairs after the first one), ``meta`` (free-form object,
carried through to the shard record). Any other key is an error, so a typo such as
``"questoin"`` is caught instead of silently dropping data. Blank lines are ignored.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.errors import ManifestError

REQUIRED_KEYS = ("video", "question", "answer")
OPTIONAL_KEYS = ("id", "task", "start", "end", "turns", "meta")


@dataclass(frozen=True)
class ManifestEntry:
    """One parsed manifest line.

    ``video`` is the resolved absolute path; ``video_ref`` is the string as written in the
    manifest (recorded in the shard so the source can be traced). ``turns`` holds the
    follow-up turns only; the conversation is ``[(question, answer)] + turns``.
    """
    line: int
    id: str
    video: str
    video_ref: str
    question: str
    answer: str
    task: str = ""
    start: float | None = None
    end: float | None = None
    turns: tuple[tuple[str, str], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        """Every question and answer of the conversation, in order."""
        return [self.question, self.answer] + [t for turn in self.turns for t in turn]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, used to ship entries to Ray tasks."""
        return {"line": self.line, "id": self.id, "video": self.video, "video_ref": self.video_ref,
                "question": self.question, "answer": self.answer, "task": self.task,
                "start": self.start, "end": self.end,
                "turns": [list(t) for t in self.turns], "meta": self.meta}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ManifestEntry":
        return ManifestEntry(line=d["line"], id=d["id"], video=d["video"], video_ref=d["video_ref"],
                             question=d["question"], answer=d["answer"], task=d["task"],
                             start=d["start"], end=d["end"],
                             turns=tuple((q, a) for q, a in d["turns"]), meta=d["meta"])


def _type_name(value: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _fail(where: str, key: str, message: str) -> ManifestError:
    return ManifestError(f"{where}: key '{key}' {message}")


def _string(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(where, key, f"must be a string, got {_type_name(value)} {value!r}")
    return value


def _seconds(obj: dict, key: str, where: str) -> float | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    # bool is an int subclass in Python; "start": true is a mistake, not 1 second.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, key, f"must be a finite number of seconds, got {_type_name(value)} {value!r}")
    if value < 0:
        raise _fail(where, key, f"must be >= 0 seconds, got {value}")
    return float(value)


def _turns(obj: dict, where: str) -> tuple[tuple[str, str], ...]:
    value = obj.get("turns", [])
    if not isinstance(value, list):
        raise _fail(where, "turns", f"must be a list of {{\"question\": ..., \"answer\": ...}} objects, "
                                    f"got {_type_name(value)}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise _fail(where, f"turns[{i}]", f"must be an object with 'question' and 'answer', got {_type_name(turn)}")
        extra = set(turn) - {"question", "answer"}
        if extra:
            raise _fail(where, f"turns[{i}]", f"has unknown keys {sorted(extra)}; only 'question' and 'answer' are allowed")
        for k in ("question", "answer"):
            if k not in turn:
                raise _fail(where, f"turns[{i}].{k}", "is missing")
            if not isinstance(turn[k], str):
                raise _fail(where, f"turns[{i}].{k}", f"must be a string, got {_type_name(turn[k])} {turn[k]!r}")
        turns.append((turn["question"], turn["answer"]))
    return tuple(turns)


def parse_manifest_line(text: str, line_no: int, base_dir: Path, source: str = "manifest") -> ManifestEntry:
    """Parse one JSONL line (``line_no`` is 1-based) into a :class:`ManifestEntry`."""
    where = f"{source} line {line_no}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
    except (ValueError, RecursionError) as e:  # integers past Python's digit limit, nesting past the stack
        raise ManifestError(f"{where}: not usable JSON ({type(e).__name__}: {str(e)[:120]}); "
                            "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: must be a JSON object, got {_type_name(obj)}")
    for key in obj:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            close = difflib.get_close_matches(key, REQUIRED_KEYS + OPTIONAL_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else " Put extra fields under 'meta'."
            raise _fail(where, key, f"is not a manifest key (allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}).{hint}")
    for key in REQUIRED_KEYS:
        if key not in obj:
            raise _fail(where, key, "is missing (required: video, question, answer)")
    video_ref = _string(obj, "video", where)
    if not video_ref:
        raise _fail(where, "video", "is an empty string; give the video's path")
    question = _string(obj, "question", where)
    answer = _string(obj, "answer", where)

    if "id" in obj:
        raw_id = obj["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise _fail(where, "id", f"must be a string or integer, got {_type_name(raw_id)} {raw_id!r}")
        sample_id = str(raw_id)
        if not sample_id:
            raise _fail(where, "id", "is an empty string")
    else:
        sample_id = str(line_no)
    task = _string(obj, "task", where) if "task" in obj else ""
    start = _seconds(obj, "start", where)
    end = _seconds(obj, "end", where)
    if start is not None and end is not None and end <= start:
        raise _fail(where, "end", f"({end}) must be greater than 'start' ({start})")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(where, "meta", f"must be an object, got {_type_name(meta)}")

    path = Path(video_ref)
    if not path.is_absolute():
        path = base_dir / path
    return ManifestEntry(line=line_no, id=sample_id, video=str(path.resolve()), video_ref=video_ref,
                         question=question, answer=answer, task=task, start=start, end=end,
                         turns=_turns(obj, where), meta=meta)


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Parse a whole manifest. Raises :class:`ManifestError` on the first bad line and on
    duplicate ids (ids key the samples in shards, the index and resume state)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}. Pass a JSONL file with one "
                            '{"video": ..., "question": ..., "answer": ...} object per line')
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    base_dir = path.parent.resolve()
    try:
        with path.open("r", encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                entry = parse_manifest_line(text, line_no, base_dir, source=str(path))
                if entry.id in seen:
                    raise ManifestError(f"{path} line {line_no}: key 'id' value '{entry.id}' repeats line "
                                        f"{seen[entry.id]}; ids must be unique")
                seen[entry.id] = line_no
                entries.append(entry)
    except UnicodeDecodeError:
        raise ManifestError(f"{path} line {_first_undecodable_line(path)}: not UTF-8 text; save the manifest "
                            "as UTF-8") from None
    if not entries:
        raise ManifestError(f"manifest {path} holds no samples")
    return entries


def _first_undecodable_line(path: Path) -> int:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 0


def cap_per_task(entries: list[ManifestEntry], samples_per_task: int) -> list[ManifestEntry]:
    """Keep the first ``samples_per_task`` entries of each task, in manifest order (0 = all)."""
    if samples_per_task <= 0:
        return entries
    counts: dict[str, int] = {}
    kept = []
    for e in entries:
        if counts.get(e.task, 0) < samples_per_task:
            counts[e.task] = counts.get(e.task, 0) + 1
            kept.append(e)
    return kept
