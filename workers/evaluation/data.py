"""Evaluation data: where it lives and how CounterFact / zsRE records become evaluation cases.

The data files are read by path (never copied into the repository). Records the editing engine
would refuse are returned alongside the cases with their violations, so a run can say what it
skipped instead of quietly evaluating fewer cases.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from editfleet.workers.editing.requests import EditRequest, FieldViolation, parse_request

DATA_DIR_ENV = "EDITFLEET_DATA_DIR"
# Each dataset's file under the data folder (shared/data/README.md).
DATASET_FILES = {"counterfact": "counterfact/counterfact-edit.json", "zsre": "zsre/zsre_mend_train-1k.json"}

CaseKind = Literal["counterfact", "zsre"]


def _repo_root() -> Path | None:
    """The folder holding pyproject.toml above this file (the source checkout), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def data_dir(explicit: str | Path | None = None) -> Path:
    """The evaluation data folder: ``explicit``, else ``$EDITFLEET_DATA_DIR``, else ``../shared/data``.

    ``../shared/data`` is tried next to the repository root first, then next to the working
    directory. An explicit or environment path must exist; it is never silently replaced.
    """
    chosen = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is not None:
        path = Path(chosen).expanduser()
        if not path.is_dir():
            source = "argument" if explicit is not None else f"${DATA_DIR_ENV}"
            raise FileNotFoundError(f"evaluation data folder {str(path)!r} (from {source}) does not exist")
        return path
    candidates = []
    root = _repo_root()
    if root is not None:
        candidates.append(root.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(repr(str(p)) for p in candidates)
    raise FileNotFoundError(
        f"no evaluation data folder found: pass one explicitly or set ${DATA_DIR_ENV}; tried {tried}")


@dataclass(frozen=True)
class EvalCase:
    """One edit and the prompts that measure it (all prompts have the subject filled in).

    ``neighborhood_answer`` is what the neighbourhood prompts must keep answering
    (CounterFact ``locality_ground_truth``, zsRE ``loc_ans``). ``case_id`` is CounterFact's
    ``case_id``, or the record's 0-based position in the zsRE file (which has no ids).
    """

    request: EditRequest
    rewrite_prompts: tuple[str, ...]
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    target_new: str
    target_true: str | None
    neighborhood_answer: str
    case_id: int
    kind: CaseKind


@dataclass(frozen=True)
class LoadedCases:
    """Valid cases, and the records refused as ``(case_id, violations)``."""

    cases: list[EvalCase]
    rejected: list[tuple[int, list[FieldViolation]]]
    valid_before: list[int] = field(default_factory=list)  # per refused record: valid cases ahead of it

    def head(self, n: int) -> "LoadedCases":
        """The first ``n`` valid cases and only the records refused on the way to them (a run
        that reads ahead to find ``n`` valid cases must not report refusals it never reached)."""
        kept = [i for i, before in enumerate(self.valid_before) if before < n]
        return LoadedCases(self.cases[:n], [self.rejected[i] for i in kept], [self.valid_before[i] for i in kept])

    def rejection_summary(self) -> str:
        """One line for logs: ``skipped N invalid records: ...`` (empty when none)."""
        if not self.rejected:
            return ""
        reasons = "; ".join(str(v) for _, violations in self.rejected for v in violations)
        return f"skipped {len(self.rejected)} invalid records: {reasons}"


def _read_records(path: str | Path, limit: int | None, offset: int) -> list[Any]:
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    end = None if limit is None else offset + limit
    return records[offset:end]


def _load(path: str | Path, limit: int | None, offset: int, kind: CaseKind) -> LoadedCases:
    answer_key, neighbour_key = ("locality_ground_truth", "locality_prompt") if kind == "counterfact" else ("loc_ans", "loc")
    cases: list[EvalCase] = []
    rejected: list[tuple[int, list[FieldViolation]]] = []
    valid_before: list[int] = []

    def refuse(case_id: int, violations: list[FieldViolation]) -> None:
        rejected.append((case_id, violations))
        valid_before.append(len(cases))

    for position, record in enumerate(_read_records(path, limit, offset), start=offset):
        if not isinstance(record, Mapping):
            refuse(position, [FieldViolation(position, "", f"must be an object, got {type(record).__name__}")])
            continue
        case_id = int(record["case_id"]) if kind == "counterfact" and "case_id" in record else position
        rid = str(case_id)
        request, violations = parse_request({**record, "case_id": rid}, position)
        answer = record.get(answer_key)
        if not isinstance(answer, str) or not answer.strip():
            violations.append(FieldViolation(position, answer_key, "must be a non-empty string", rid))
        if request is not None and not request.neighbors:
            violations.append(FieldViolation(position, neighbour_key, "is missing: no neighbourhood prompt", rid))
        if violations or request is None:
            refuse(case_id, violations)
            continue
        # zsRE's unrelated question has no question mark; the reference code (MEMIT) appends one.
        neighbours = request.neighbors if kind == "counterfact" else tuple(q + "?" for q in request.neighbors)
        cases.append(EvalCase(
            request=request,
            rewrite_prompts=(request.text,),
            paraphrase_prompts=request.paraphrases,
            neighborhood_prompts=neighbours,
            target_new=request.target_new,
            target_true=request.target_true,
            neighborhood_answer=answer,
            case_id=case_id,
            kind=kind,
        ))
    return LoadedCases(cases, rejected, valid_before)


def load_counterfact(path: str | Path, limit: int | None = None, offset: int = 0) -> LoadedCases:
    """Cases from a CounterFact file (reduced format, see shared/data/README.md).

    ``offset``/``limit`` select records by position in the file, valid or not.
    """
    return _load(path, limit, offset, "counterfact")


def load_zsre(path: str | Path, limit: int | None = None, offset: int = 0) -> LoadedCases:
    """Cases from a zsRE (MEND) file; ``case_id`` is the record's position in the file."""
    return _load(path, limit, offset, "zsre")



def load_dataset(dataset: CaseKind, path: str | Path | None = None, limit: int | None = None,
                 offset: int = 0) -> tuple[Path, LoadedCases]:
    """The records file (``path``, else the dataset's file under :func:`data_dir`) and its cases."""
    chosen = Path(path) if path else data_dir() / DATASET_FILES[dataset]
    load = load_counterfact if dataset == "counterfact" else load_zsre
    return chosen, load(chosen, limit=limit, offset=offset)
