"""`editfleet protect-prompts`: write a protected-prompts file from CounterFact or zsRE records.

Protected prompts (``--protect FILE`` of ``editfleet serve`` and ``editfleet bench``) keep edits
off the shape of prompts like them. The engine's figures came from files of records the run does
not edit, each prompt followed by the answer the model should keep; this command writes such a
file from a record range, so a benchmark with ``--protect`` can be repeated from its command.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from editfleet.workers.evaluation.data import DATASET_FILES, EvalCase, load_dataset

KINDS = ("rewrite", "paraphrase", "neighbour")


def check_kinds(kinds: Sequence[str]) -> None:
    """Refuse an empty or unknown choice of prompt kinds (``ValueError``)."""
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {', '.join(KINDS)}, got {', '.join(kinds) or 'none'}")


def protected_lines(cases: Sequence[EvalCase], kinds: Sequence[str] = ("rewrite",)) -> list[str]:
    """One ``prompt answer`` line per prompt of the chosen kinds, with the answer the unedited
    model should give: the true answer for rewrite and paraphrase prompts (cases without one are
    left out of those kinds), the neighbourhood answer for neighbourhood prompts."""
    check_kinds(kinds)
    lines: list[str] = []
    for case in cases:
        if case.target_true is not None:
            if "rewrite" in kinds:
                lines += [f"{p} {case.target_true}" for p in case.rewrite_prompts]
            if "paraphrase" in kinds:
                lines += [f"{p} {case.target_true}" for p in case.paraphrase_prompts]
        if "neighbour" in kinds:
            lines += [f"{p} {case.neighborhood_answer}" for p in case.neighborhood_prompts]
    return [" ".join(line.split()) for line in lines]


def _records(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        first, stop = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (record positions), got {text!r}") from None
    if not sep or first < 0 or stop <= first:
        raise argparse.ArgumentTypeError(f"expected START:END with 0 <= START < END, got {text!r}")
    return first, stop


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    try:
        check_kinds(kinds)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="editfleet protect-prompts", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASET_FILES), required=True)
    p.add_argument("--data", help="records file (default: the dataset's file under the data folder)")
    p.add_argument("--records", type=_records, required=True, metavar="START:END",
                   help="positions in the file, END excluded; choose records the run does not edit or score")
    p.add_argument("--kinds", type=_kinds, default="rewrite",
                   help=f"comma-separated prompt kinds among {', '.join(KINDS)} (default: rewrite)")
    p.add_argument("--out", required=True, help="file to write, one prompt per line")
    args = p.parse_args(argv)
    first, stop = args.records
    try:
        path, loaded = load_dataset(args.dataset, args.data, limit=stop - first, offset=first)
    except (OSError, ValueError) as exc:
        p.error(f"--data: {exc}")
    lines = protected_lines(loaded.cases, args.kinds)
    if not lines:
        p.error(f"--records {first}:{stop} of {path} gave no prompt ({len(loaded.rejected)} records refused)")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    skipped = f"; {loaded.rejection_summary()}" if loaded.rejected else ""
    print(f"wrote {len(lines)} prompts from {len(loaded.cases)} records of {path} to {args.out}{skipped}")
    return 0
