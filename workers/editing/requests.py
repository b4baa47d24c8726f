"""Edit requests and their validation.

Kept free of torch so the scheduler can refuse bad input at submission time with the same
rules the engine applies; the engine adds the checks that need a tokenizer (context length).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class EditRequest:
    """One fact to rewrite.

    Attributes:
        prompt: the fact's prompt with ``{}`` where the subject stands (a literal subject is
            turned into ``{}`` by ``from_record``), e.g. ``"{} is located in the city of"``.
        subject: the entity whose fact changes, e.g. ``"Eiffel Tower"``.
        target_new: what the model must say after the edit (without a leading space).
        target_true: what it says now, when known (used for evaluation and validation).
        paraphrases: other prompts (subject filled in) that should also give ``target_new``.
        neighbors: prompts about other subjects that must keep ``target_true``-style answers.
        record_id: the caller's identifier for error messages (case id, line number).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[str, ...] = ()
    record_id: str = ""

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class FieldViolation:
    """One reason a record was refused: which record, which field, why."""

    index: int
    field: str
    description: str
    record_id: str = ""

    def __str__(self) -> str:
        who = f"edit {self.index}" + (f" ({self.record_id})" if self.record_id else "")
        return f"{who}: field '{self.field}': {self.description}"


class EditValidationError(ValueError):
    """Raised before any weight changes when one or more records are invalid."""

    def __init__(self, violations: Sequence[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations))

    def __reduce__(self):
        # Survive pickling (Ray, multiprocessing) with the violations intact.
        return (EditValidationError, (self.violations,))


def _text(record: Mapping[str, Any], key: str, index: int, violations: list[FieldViolation], rid: str,
          required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            violations.append(FieldViolation(index, key, "is missing", rid))
        return None
    if not isinstance(value, str):
        violations.append(FieldViolation(index, key, f"must be a string, got {type(value).__name__}", rid))
        return None
    if required and not value.strip():
        violations.append(FieldViolation(index, key, "is empty", rid))
        return None
    if len(value) > MAX_TEXT_CHARS:
        violations.append(FieldViolation(index, key, f"is {len(value)} characters, limit {MAX_TEXT_CHARS}", rid))
        return None
    return value


def _texts(record: Mapping[str, Any], key: str, index: int, violations: list[FieldViolation], rid: str) -> tuple[str, ...]:
    value = record.get(key) or ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        violations.append(FieldViolation(index, key, "must be a list of strings", rid))
        return ()
    out = []
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            violations.append(FieldViolation(index, f"{key}[{j}]", "must be a non-empty string", rid))
        elif len(item) > MAX_TEXT_CHARS:
            violations.append(FieldViolation(index, f"{key}[{j}]", f"is {len(item)} characters, limit {MAX_TEXT_CHARS}", rid))
        else:
            out.append(item)
    return tuple(out)


def normalise_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Map CounterFact and zsRE records (as in ``shared/data``) onto editfleet's field names.

    editfleet JSON Lines records pass through unchanged.
    """
    if "src" in record and "alt" in record:  # zsRE
        answers = record.get("answers") or []
        return {
            "prompt": record.get("src"),
            "subject": record.get("subject"),
            "target_new": record.get("alt"),
            "target_true": answers[0] if isinstance(answers, list) and answers else None,
            "paraphrases": [record["rephrase"]] if record.get("rephrase") else [],
            "neighbors": [record["loc"]] if record.get("loc") else [],
            "record_id": str(record.get("case_id", record.get("record_id", ""))),
        }
    if "ground_truth" in record or "rephrase_prompt" in record:  # CounterFact (reduced format)
        return {
            "prompt": record.get("prompt"),
            "subject": record.get("subject"),
            "target_new": record.get("target_new"),
            "target_true": record.get("ground_truth"),
            "paraphrases": [record["rephrase_prompt"]] if record.get("rephrase_prompt") else [],
            "neighbors": [record["locality_prompt"]] if record.get("locality_prompt") else [],
            "record_id": str(record.get("case_id", record.get("record_id", ""))),
        }
    return dict(record)


def parse_request(record: Mapping[str, Any], index: int = 0) -> tuple[EditRequest | None, list[FieldViolation]]:
    """Validate one record (any accepted format) and build its request, or list what is wrong."""
    rec = normalise_record(record)
    rid = str(rec.get("record_id") or "")
    violations: list[FieldViolation] = []
    prompt = _text(rec, "prompt", index, violations, rid)
    subject = _text(rec, "subject", index, violations, rid)
    target_new = _text(rec, "target_new", index, violations, rid)
    target_true = _text(rec, "target_true", index, violations, rid, required=False)
    paraphrases = _texts(rec, "paraphrases", index, violations, rid)
    neighbors = _texts(rec, "neighbors", index, violations, rid)
    if prompt is not None and subject is not None:
        if "{}" in prompt:
            if prompt.count("{}") != 1:
                violations.append(FieldViolation(index, "prompt", "must contain '{}' exactly once", rid))
        elif subject in prompt:
            # Literal subject: replace its last occurrence, the one the fact is about.
            head, _, tail = prompt.rpartition(subject)
            prompt = head + "{}" + tail
        else:
            violations.append(FieldViolation(index, "subject", f"{subject!r} does not occur in the prompt", rid))
        if "{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1):
            violations.append(FieldViolation(index, "prompt", "contains braces other than the one '{}'", rid))
    if target_new is not None and target_true is not None and target_new.strip() == target_true.strip():
        violations.append(FieldViolation(index, "target_new", "equals target_true: nothing to edit", rid))
    if violations:
        return None, violations
    return EditRequest(
        prompt=prompt, subject=subject, target_new=target_new, target_true=target_true,
        paraphrases=paraphrases, neighbors=neighbors, record_id=rid,
    ), []


def parse_requests(records: Sequence[Mapping[str, Any]]) -> list[EditRequest]:
    """Validate all records; raise one ``EditValidationError`` listing every problem."""
    requests, violations = [], []
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            violations.append(FieldViolation(i, "", f"must be an object, got {type(record).__name__}"))
            continue
        request, problems = parse_request(record, i)
        violations.extend(problems)
        if request is not None:
            requests.append(request)
    if violations:
        raise EditValidationError(violations)
    return requests


def read_protected_prompts(files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The non-blank lines of ``files``, in order; an error names a missing or empty file."""
    prompts: list[str] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"protected prompts not found: {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"protected prompts file {path} has no prompt (one per line)")
        prompts += lines
    return prompts


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of protected prompts as read: what a checkpoint id and a saved state record of them."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
