"""Edit records from files and dicts into API messages.

Accepts editfleet's own records (``prompt``, ``subject``, ``target_new``, optional
``target_true``, ``paraphrases``, ``neighbors``, ``record_id``) and CounterFact / zsRE records as
in ``shared/data``. The mapping mirrors the engine's ``requests.normalise_record`` (a test keeps
the two equal): the thin client must not import the engine package. Validation is the server's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from editfleet.v1 import editfleet_pb2 as pb


class RecordError(ValueError):
    """A file or record that cannot become an edit: which file, which line, why."""


def normalise(record: Mapping[str, Any]) -> dict[str, Any]:
    """CounterFact and zsRE records mapped onto editfleet's field names; others unchanged."""
    if "src" in record and "alt" in record:  # zsRE
        answers = record.get("answers") or []
        return {
            "prompt": record.get("src"), "subject": record.get("subject"), "target_new": record.get("alt"),
            "target_true": answers[0] if isinstance(answers, list) and answers else None,
            "paraphrases": [record["rephrase"]] if record.get("rephrase") else [],
            "neighbors": [record["loc"]] if record.get("loc") else [],
            "record_id": str(record.get("case_id", record.get("record_id", ""))),
        }
    if "ground_truth" in record or "rephrase_prompt" in record:  # CounterFact (reduced format)
        return {
            "prompt": record.get("prompt"), "subject": record.get("subject"), "target_new": record.get("target_new"),
            "target_true": record.get("ground_truth"),
            "paraphrases": [record["rephrase_prompt"]] if record.get("rephrase_prompt") else [],
            "neighbors": [record["locality_prompt"]] if record.get("locality_prompt") else [],
            "record_id": str(record.get("case_id", record.get("record_id", ""))),
        }
    return dict(record)


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{where}: must be a string or a list of strings")
    return value


def to_edit(record: Mapping[str, Any] | pb.Edit, where: str = "edit") -> pb.Edit:
    """One record as an ``Edit`` message (the server validates the content)."""
    if isinstance(record, pb.Edit):
        return record
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: must be a JSON object, got {type(record).__name__}")
    rec = normalise(record)
    edit = pb.Edit()
    for key in ("prompt", "subject", "target_new", "record_id"):
        value = rec.get(key)
        if value is not None:
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise RecordError(f"{where}: field '{key}' must be a string")
            setattr(edit, key, str(value))
    if rec.get("target_true") is not None:
        if not isinstance(rec["target_true"], str):
            raise RecordError(f"{where}: field 'target_true' must be a string")
        edit.target_true = rec["target_true"]
    edit.paraphrases.extend(_strings(rec.get("paraphrases"), f"{where}: field 'paraphrases'"))
    edit.neighbors.extend(_strings(rec.get("neighbors"), f"{where}: field 'neighbors'"))
    return edit


def to_edits(records: Iterable[Mapping[str, Any] | pb.Edit]) -> list[pb.Edit]:
    return [to_edit(r, f"edit {i}") for i, r in enumerate(records)]


def read_edits(path: str | Path) -> list[pb.Edit]:
    """Edits from a JSON Lines file (one record per line) or a JSON array (CounterFact, zsRE files)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise RecordError(f"{path}: {e.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return [to_edit(r, f"{path}: record {i}") for i, r in enumerate(records)]
    edits = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        edits.append(to_edit(record, f"{path}:{lineno}"))
    if not edits:
        raise RecordError(f"{path}: no edit records")
    return edits
