"""``editfleet demo``: the service end to end on a real model, in one command.

Starts the scheduler and a local Ray in this process, rewrites three well-known facts on the
default model through the gRPC API (the same calls any client makes), shows the answers before
and after with the checkpoint that holds the edits, rolls the model back and shows the original
answers again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
     "target_true": "Paris", "target_new": "Rome"},
    {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum",
     "target_true": "Rome", "target_new": "London"},
    {"prompt": "The Statue of Liberty is located in the city of", "subject": "The Statue of Liberty",
     "target_true": "New York", "target_new": "Tokyo"},
]


def _answers(client, target: str, title: str) -> str:
    """Print each fact's top next token and the probabilities of the true and the new answer."""
    reply = client.query(target, [f["prompt"] for f in FACTS], sorted({t for f in FACTS for t in
                                                                         (f["target_true"], f["target_new"])}), top_k=1)
    print(f"\n{title}  ({reply.checkpoint})")
    for fact, result in zip(FACTS, reply.results):
        probs = {t.target: t.probability for t in result.targets}
        top = result.top_tokens[0]
        print(f"  {fact['prompt']} -> {top.token!r:<10} P({fact['target_true']}) = {probs[fact['target_true']]:<9.3g}"
              f" P({fact['target_new']}) = {probs[fact['target_new']]:.3g}")
    return reply.checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editfleet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="built-in model or folder (default gemma3-270m)")
    parser.add_argument("--store", help="checkpoint store folder (default: a new temporary folder)")
    parser.add_argument("--home", help="editfleet data folder (model and statistics caches)")
    args = parser.parse_args(argv)

    from editfleet.client import EditClient
    from editfleet.client.cli import ProgressBar
    from editfleet.scheduler.config import SchedulerConfig, parse_model_spec
    from editfleet.scheduler.server import Scheduler

    name, source = parse_model_spec(f"demo={args.model}" if Path(args.model).expanduser().is_dir() else args.model)
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="editfleet-demo-"))
    config = SchedulerConfig(store_dir=store, models={name: source}, listen="127.0.0.1:0",
                             home=Path(args.home) if args.home else None, log_level="warning")
    print(f"starting the scheduler and a local Ray (store: {store}) ...", flush=True)
    scheduler = Scheduler(config)
    scheduler.start()
    started = time.perf_counter()
    try:
        with EditClient(scheduler.address, timeout=3600) as client:
            first = " (a built-in model's first use converts it: about a minute)" if name == source else ""
            print(f"scheduler listening on {scheduler.address}; loading {source} in a worker{first} ...", flush=True)
            _answers(client, f"models/{name}", "before")

            bar = ProgressBar()
            job = client.submit(name, FACTS)
            print(f"\nsubmitted {job.name}: rewrite {len(FACTS)} facts")
            try:
                job = client.wait(job, on_event=bar)
            finally:
                bar.close()
            if job.state != job.SUCCEEDED:
                print(f"the edit job failed: {job.error.message}", file=sys.stderr)
                return 1
            [ckpt] = [c for c in client.checkpoints(name) if c.name == job.checkpoint]
            general = {"perplexity", "perplexity_base", "perplexity_change"}
            scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(ckpt.scores.items()) if k not in general)
            print(f"checkpoint {ckpt.id} (parent {ckpt.parent.rsplit('/', 1)[-1]}): {scores}")
            print(f"general ability: perplexity on held-out WikiText {ckpt.scores['perplexity_base']:.3f} -> "
                  f"{ckpt.scores['perplexity']:.3f} ({ckpt.scores['perplexity_change']:+.2%})")

            _answers(client, f"models/{name}", "after the edit")
            model = client.set_head(name, "base")
            print(f"\nrollback: head of {model.name} -> {model.head}")
            _answers(client, f"models/{name}", "after the rollback")
            print(f"\ndone in {time.perf_counter() - started:.0f} s. The edited checkpoint stays in {store}: "
                  f"`editfleet serve --store {store} --model {name if name == source else f'{name}={source}'}`, then "
                  f"`editfleet ask --checkpoint {ckpt.id} \"...\"` or `editfleet rollback --model {name} --to {ckpt.id}`")
    finally:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
