"""``editfleet bench``: N sequential edits in batches, the paper's evaluation before and after.

Prints a table and writes the same figures as JSON (keys ``pre``, ``post``, ``timing``,
``peak_rss_mb``, ``config``, plus projector and target-optimisation summaries, ``pre.by_batch``
and ``post.by_batch`` (efficacy, generalization, specificity of each batch's cases), and
``perplexity_by_batch`` with ``--track-perplexity``), so runs can be compared and quoted in
docs/benchmarks.md. ``perplexity`` is measured on the first 1024 tokens of the held-out WikiText
text (one article), ``perplexity_heldout`` on all of it (four articles). ``--save-state`` keeps the edited model as the editor's state (low-rank
deltas per batch) for later analysis.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from editfleet.workers.editing.config import EditConfig


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs, values parsed as JSON when they parse (numbers, lists, null)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="editfleet bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m", help="built-in model name or a local HF folder")
    p.add_argument("--method", choices=["alphaedit", "memit"], default="alphaedit")
    p.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    p.add_argument("--data", help="data file (default: the dataset's file in the data folder)")
    p.add_argument("--edits", type=int, default=100, help="number of sequential edits N")
    p.add_argument("--batch", type=int, default=100, help="edits per engine batch B")
    p.add_argument("--offset", type=int, default=0, help="skip this many records of the data file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the figures here")
    p.add_argument("--compare-loop", action="store_true",
                   help="also time the per-request target loop against the batched optimisation on the first "
                        "batch (after one untimed batched warm-up run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"engine setting override (repeatable); settings: "
                        f"{', '.join(f.name for f in EditConfig.__dataclass_fields__.values())}")
    p.add_argument("--home", help="model cache folder (default: $EDITFLEET_HOME or ~/.cache/editfleet)")
    p.add_argument("--corpus", action="append", default=[], metavar="FILE",
                   help="statistics corpus text file, instead of the default WikiText-2 (repeatable, read in "
                        "order; as `editfleet serve --corpus`)")
    p.add_argument("--protect", action="append", default=[], metavar="FILE",
                   help="protected prompts, one per line (repeatable): every token's key joins each update with "
                        "the setting protect_weight (as `editfleet serve --protect`)")
    p.add_argument("--cache-dir", help="statistics/projector cache (default: <home>/stats)")
    p.add_argument("--fluency-cases", type=int, default=100)
    p.add_argument("--fluency-unedited", type=int, default=100, metavar="N",
                   help="also score the fluency of generations from the prompts of the N valid cases after the "
                        "edited ones, which no edit touches (JSON: fluency_unedited; 0: off)")
    p.add_argument("--track-perplexity", action="store_true",
                   help="also measure the WikiText perplexity after every batch (JSON: perplexity_by_batch)")
    p.add_argument("--save-state", metavar="DIR",
                   help="write the editor's state (settings, contexts, K_p, every batch's low-rank deltas) "
                        "here, so the edited model can be rebuilt and inspected without editing again")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (a GPU when one is visible)")
    return p


def _cases(args):
    from editfleet.workers.evaluation.data import load_dataset

    # Read enough records that N valid cases remain after refusing invalid ones.
    path, loaded = load_dataset(args.dataset, args.data, limit=(args.edits + args.fluency_unedited) * 2 + 50,
                                offset=args.offset)
    if len(loaded.cases) < args.edits:
        raise SystemExit(f"{path} has only {len(loaded.cases)} valid cases from offset {args.offset}")
    used = loaded.head(args.edits)
    if used.rejected:
        print(f"[bench] {used.rejection_summary()}", file=sys.stderr)
    unedited = loaded.cases[args.edits:args.edits + args.fluency_unedited]
    if len(unedited) < args.fluency_unedited:
        print(f"[bench] only {len(unedited)} unedited cases follow the edited ones", file=sys.stderr)
    return used.cases, len(used.rejected), unedited


def _evaluate(args, model, tok, cases, unedited) -> dict[str, Any]:
    from editfleet.workers.evaluation.fluency import fluency, greedy_generate
    from editfleet.workers.evaluation.metrics import evaluate_counterfact, evaluate_zsre, perplexity

    # Per batch as well: after a sequential stream, the first batches' figures say how well the
    # early edits held up under the later ones.
    if args.dataset == "counterfact":
        scores = evaluate_counterfact(model, tok, cases, fluency_cases=args.fluency_cases, group=args.batch)
    else:
        scores = evaluate_zsre(model, tok, cases, group=args.batch)
        prompts = [p for c in cases[: args.fluency_cases] for p in c.rewrite_prompts]
        scores["fluency"] = fluency(greedy_generate(model, tok, prompts)) if prompts else None
    scores["by_batch"] = scores.pop("by_group")
    # Generations from prompts no edit touched: whether the edits changed how prompts of the
    # same shape continue (a zsRE batch made other questions repeat themselves; docs/engine.md).
    if unedited:
        scores["fluency_unedited"] = fluency(greedy_generate(model, tok, [c.rewrite_prompts[0] for c in unedited]))
    ppl = perplexity(model, tok)
    scores["perplexity"] = ppl["perplexity"]
    # The 1024 tokens above are one article (the figure every earlier run quotes); the whole
    # held-out text is four, about 12k tokens (docs/benchmarks.md, tenth session).
    scores["perplexity_heldout"] = perplexity(model, tok, max_tokens=None)["perplexity"]
    scores["wikitext_nll"] = ppl["nll"]
    return scores


def run(args) -> dict[str, Any]:
    from editfleet.workers.editing.engine import Editor
    from editfleet.workers.editing.requests import read_protected_prompts
    from editfleet.workers.editing.statistics import checked_corpus
    from editfleet.workers.editing.targets import optimise_targets, optimise_targets_loop
    from editfleet.workers.evaluation.drift import drift, snapshot
    from editfleet.workers.evaluation.metrics import heldout_text, perplexity
    from editfleet.workers.models.registry import editfleet_home, load_model

    try:  # before the model loads
        corpus = checked_corpus(args.corpus) if args.corpus else None
    except FileNotFoundError as exc:
        raise SystemExit(f"--corpus: {exc}") from None
    try:
        read_protected_prompts(args.protect)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--protect: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tok = load_model(args.model, args.home, args.device)
    cases, rejected, unedited = _cases(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else editfleet_home(args.home) / "stats"
    overrides = {"seed": args.seed, **_overrides(args.overrides)}
    editor = Editor.for_model(model, tok, args.method, cache_dir=cache_dir, corpus=corpus,
                              protect=args.protect or None, **overrides)
    print(f"[bench] {args.model} {args.method} {args.dataset}: {len(cases)} edits in batches of {args.batch}; "
          f"layers {list(editor.config.layers)}", file=sys.stderr)

    t = time.perf_counter()
    pre = _evaluate(args, model, tok, cases, unedited)
    # What the model says right after each subject's name, edited and untouched (evaluation/drift.py).
    edited = [c.request.subject for c in cases]
    named = set(edited)
    untouched = [c.request.subject for c in unedited if c.request.subject not in named]
    subjects = {"edited": snapshot(model, tok, edited)}
    if untouched:
        subjects["unedited"] = snapshot(model, tok, untouched)
    eval_seconds = time.perf_counter() - t
    print(f"[bench] pre-edit evaluation {eval_seconds:.1f}s", file=sys.stderr)

    timing: dict[str, float] = {"stats_seconds": 0.0, "targets_seconds": 0.0, "update_seconds": 0.0}
    t = time.perf_counter()
    editor.projectors() if args.method == "alphaedit" else editor.statistics()
    timing["stats_seconds"] = time.perf_counter() - t
    heldout_moments = editor.text_moments(heldout_text())
    probs, steps, gaps, tracked = [], [], [], []
    batches = [cases[i:i + args.batch] for i in range(0, len(cases), args.batch)]
    for b, batch in enumerate(batches):
        requests = [c.request for c in batch]
        if args.compare_loop and b == 0:
            contexts = editor.context_templates()
            # One untimed batched run first: on an H200 the first optimisation of a batch this
            # size took 42 s and the same one later 12 s (a warm-up on 8 requests did not remove
            # the difference), a one-time cost that a serving worker pays once, not per batch.
            t = time.perf_counter()
            optimise_targets(model, tok, editor.adapter, requests, contexts, editor.config)
            timing["warmup_targets_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            optimise_targets(model, tok, editor.adapter, requests, contexts, editor.config)
            batched = time.perf_counter() - t
            t = time.perf_counter()
            optimise_targets_loop(model, tok, editor.adapter, requests, contexts, editor.config)
            timing["loop_targets_seconds"] = time.perf_counter() - t
            timing["batched_targets_seconds"] = batched
            timing["batched_speedup"] = timing["loop_targets_seconds"] / batched
            print(f"[bench] targets on batch 0: loop {timing['loop_targets_seconds']:.1f}s, "
                  f"batched {batched:.1f}s ({timing['batched_speedup']:.2f}x)", file=sys.stderr)
        result = editor.apply(requests)
        for key in ("targets_seconds", "update_seconds"):
            timing[key] += result.timings[key]
        timing["stats_seconds"] += result.timings["stats_seconds"]
        probs += result.target_prob
        steps += result.target_steps
        gaps += result.value_gap
        line = (f"[bench] batch {b + 1}/{len(batches)}: targets {result.timings['targets_seconds']:.1f}s, "
                f"update {result.timings['update_seconds']:.1f}s, mean target p {sum(result.target_prob) / len(batch):.3f}")
        if args.track_perplexity:
            t = time.perf_counter()
            tracked.append(perplexity(model, tok)["perplexity"])
            timing["track_seconds"] = timing.get("track_seconds", 0.0) + time.perf_counter() - t
            line += f", perplexity {tracked[-1]:.2f}"
        print(line, file=sys.stderr)
    edit_seconds = timing["stats_seconds"] + timing["targets_seconds"] + timing["update_seconds"]

    if args.save_state:
        editor.save_state(args.save_state)
    # The statistics promise little change on their own keys; the held-out text says what the
    # edits' deltas do to text the statistics never saw (docs/engine.md, Known limits).
    sample, heldout = editor.output_change(editor.statistics()), editor.output_change(heldout_moments)
    output_change = {str(i): {"statistics": sample[i], "heldout": heldout[i],
                              "ratio": heldout[i] / sample[i] if sample[i] > 0 else None} for i in sample}
    print("[bench] mean squared output change of each edited projection, statistics sample / held-out text: "
          + ", ".join(f"layer {i} {sample[i]:.4g} / {heldout[i]:.4g}" for i in sample), file=sys.stderr)
    t = time.perf_counter()
    post = _evaluate(args, model, tok, cases, unedited)
    post["subject_drift"] = {name: drift(model, tok, before) for name, before in subjects.items()}
    post["output_change"] = output_change
    timing["eval_seconds"] = eval_seconds + time.perf_counter() - t
    timing["seconds_per_edit"] = edit_seconds / len(cases)
    timing["seconds_per_edit_without_stats"] = (timing["targets_seconds"] + timing["update_seconds"]) / len(cases)
    timing["total_seconds"] = time.perf_counter() - started
    return {
        "model": args.model, "method": args.method, "dataset": args.dataset, "edits": len(cases),
        "batch": args.batch, "seed": args.seed, "rejected_records": rejected,
        "pre": pre, "post": post, "timing": timing,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": editor.config.to_dict(),
        "corpus": [str(c.path) for c in corpus] if corpus else "default",
        "protect": {"files": list(args.protect), "prompts": len(editor.protect)} if editor.protect else None,
        "fluency_unedited_cases": len(unedited),
        "projectors": {str(i): v for i, v in editor.projector_info.items()},
        "targets": {"mean_prob": sum(probs) / len(probs), "mean_steps": sum(steps) / len(steps),
                    "converged": sum(p >= 0.95 for p in probs) / len(probs),
                    "mean_value_gap": sum(gaps) / len(gaps)},
        **({"perplexity_by_batch": tracked} if args.track_perplexity else {}),
        **({"state": str(args.save_state)} if args.save_state else {}),
        "torch_threads": torch.get_num_threads(),
        "device": _device_name(model),
        "date": time.strftime("%Y-%m-%d"),
    }


def _device_name(model) -> str:
    from editfleet.workers.models.forward import model_device

    device = model_device(model)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table(report: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    keys = ["efficacy", "generalization", "specificity", "fluency", "fluency_unedited", "perplexity",
            "perplexity_heldout"]
    extra = [k for k in ("efficacy_top1", "generalization_top1", "specificity_top1") if k in report["pre"]]
    lines = [f"{report['model']} / {report['method']} / {report['dataset']}: {report['edits']} edits, "
             f"batches of {report['batch']}", f"{'metric':<22}{'pre':>10}{'post':>10}"]
    for k in keys + extra:
        pre, post = report["pre"].get(k), report["post"].get(k)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{k:<22}{fmt(pre):>10}{fmt(post):>10}")
    lines.append("post-edit by batch (efficacy / generalization / specificity): " + "; ".join(
        f"{b + 1}: {g['efficacy']:.3f} / {g['generalization']:.3f} / {g['specificity']:.3f}"
        for b, g in enumerate(report["post"]["by_batch"])))
    lines.append("subject drift, KL(before || after) in nats / most likely next token kept: " + "; ".join(
        f"{name} subjects {d['kl']:.3f} / {d['top1_kept']:.2f}" for name, d in report["post"]["subject_drift"].items()))
    t = report["timing"]
    lines.append("timing: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MB; targets: mean p {report['targets']['mean_prob']:.3f}, "
                 f"mean steps {report['targets']['mean_steps']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.edits <= 0 or args.batch <= 0:
        raise SystemExit("--edits and --batch must be positive")
    from editfleet.workers.models.registry import resolve_device

    try:
        args.device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from None
    report = run(args)
    print(table(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
