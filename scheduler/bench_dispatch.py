"""``editfleet bench-service``: how fast the service turns submissions into engine work.

Runs the real service (scheduler, SQLite queue, local Ray, one worker actor) on a tiny model
with engine settings that make each edit cheap, so that the figures are about the service:

- submit-to-dispatch latency: job creation to dispatch, both stamped by the scheduler, on an
  idle service (one job at a time); also the client-side submit round trip and end to end;
- throughput: N single-edit jobs submitted at once, with coalescing (one engine batch for many
  jobs) and without it (one batch per job), in jobs per second.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

# Cheap edits on the tiny model (fewer statistics tokens than its 192 key dimensions leave a null space).
ENGINE = {"v_max_steps": 3, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "nullspace_energy": 1e-6,
          "stats_tokens": 128, "stats_max_length": 64, "n_prefixes": 1, "prefix_tokens": 4, "layers": [2, 3]}
_WORDS = ("the of and to in is was for on as with by he it at from his an were are which this be has or had "
          "city river tower museum capital language music science history king war church team season album").split()


def synthetic_corpus(path: Path, words: int = 3000, seed: int = 0) -> Path:
    """Varied plain text (seeded word salad in sentences) for preserved-key statistics of tiny models."""
    rng = random.Random(seed)
    sentences = []
    while words > 0:
        n = rng.randint(6, 16)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    path.write_text("\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)) + "\n")
    return path


def _edit(i: int) -> dict[str, str]:
    return {"prompt": f"Tower number {i} is located in", "subject": f"Tower number {i}", "target_new": "Rome"}


def _summary(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1], "n": len(ordered)}


def _ms(ts) -> float:
    return ts.ToNanoseconds() / 1e6


def _serve(root: Path, model: Path, corpus: Path, max_batch_edits: int):
    from editfleet.scheduler.config import SchedulerConfig
    from editfleet.scheduler.server import Scheduler

    config = SchedulerConfig(store_dir=root / "store", models={"tiny": str(model)}, listen="127.0.0.1:0",
                             home=root / "home", corpus=[corpus], perplexity_text=corpus, engine_overrides=ENGINE,
                             max_batch_edits=max_batch_edits, log_level="warning")
    scheduler = Scheduler(config)
    scheduler.start()
    return scheduler


def _throughput(client, first: int, jobs: int) -> dict[str, Any]:
    start = time.perf_counter()
    submitted = [client.submit("tiny", [_edit(first + i)]) for i in range(jobs)]
    done = [client.wait(j, timeout=600) for j in submitted]
    seconds = time.perf_counter() - start
    failed = [j.name for j in done if j.state != j.SUCCEEDED]
    if failed:
        raise RuntimeError(f"jobs failed during the benchmark: {failed}")
    return {"jobs": jobs, "seconds": seconds, "jobs_per_s": jobs / seconds, "batches": len({j.batch for j in done})}


def run(latency_jobs: int, throughput_jobs: int, root: Path) -> dict[str, Any]:
    from editfleet.client import EditClient
    from editfleet.scheduler.ray_setup import init_ray
    from editfleet.workers.models.tiny import save_tiny

    model = save_tiny(root / "tiny-llama", "llama", 0)
    corpus = synthetic_corpus(root / "corpus.txt")
    init_ray()
    result: dict[str, Any] = {"engine_settings": ENGINE, "model": "tiny llama (6 layers, d_model 64)"}
    scheduler = _serve(root, model, corpus, max_batch_edits=100)
    try:
        with EditClient(scheduler.address) as client:
            warm = client.wait(client.submit("tiny", [_edit(-1)]), timeout=600)  # loads the worker, fills caches
            if warm.state != warm.SUCCEEDED:
                raise RuntimeError(f"warm-up job failed: {warm.error.message}")
            rpc, dispatch, total = [], [], []
            for i in range(latency_jobs):
                t = time.perf_counter()
                job = client.submit("tiny", [_edit(i)])
                rpc.append((time.perf_counter() - t) * 1e3)
                job = client.wait(job, timeout=600)
                total.append((time.perf_counter() - t) * 1e3)
                dispatch.append(_ms(job.start_time) - _ms(job.create_time))
            result["latency_ms"] = {"submit_rpc": _summary(rpc), "submit_to_dispatch": _summary(dispatch),
                                    "submit_to_done": _summary(total)}
            result["throughput_coalesced"] = _throughput(client, 1000, throughput_jobs)
    finally:
        scheduler.stop()
    scheduler = _serve(root, model, corpus, max_batch_edits=1)
    try:
        with EditClient(scheduler.address) as client:
            client.wait(client.submit("tiny", [_edit(-2)]), timeout=600)
            result["throughput_one_job_per_batch"] = _throughput(client, 2000, throughput_jobs)
    finally:
        scheduler.stop()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editfleet bench-service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-jobs", type=int, default=10, help="jobs submitted one at a time")
    parser.add_argument("--throughput-jobs", type=int, default=20, help="jobs submitted at once")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="editfleet-bench-") as tmp:
        result = run(args.latency_jobs, args.throughput_jobs, Path(tmp))
    lat = result["latency_ms"]
    print(f"submit -> dispatch (idle service): median {lat['submit_to_dispatch']['median']:.1f} ms, "
          f"p90 {lat['submit_to_dispatch']['p90']:.1f} ms")
    print(f"submit round trip: median {lat['submit_rpc']['median']:.1f} ms; "
          f"submit -> done (tiny edit): median {lat['submit_to_done']['median']:.0f} ms")
    for key in ("throughput_coalesced", "throughput_one_job_per_batch"):
        t = result[key]
        print(f"{key}: {t['jobs']} jobs in {t['seconds']:.2f} s = {t['jobs_per_s']:.1f} jobs/s ({t['batches']} batches)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
