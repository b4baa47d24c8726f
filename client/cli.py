"""``editfleet``: the one command line of the project.

Client subcommands (submit, status, watch, jobs, checkpoints, ask, rollback, export) need only
the thin client. ``serve`` and ``demo`` import the scheduler, ``bench`` the engine and
``models`` the model registry, each only when that subcommand runs, so the client side stays
light and starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from google.protobuf import json_format

from editfleet.v1 import editfleet_pb2 as pb

from .client import EditClient, EditFleetError, model_name
from .records import RecordError, read_edits

DEFAULT_SERVER = "127.0.0.1:50051"

# Subcommands that own their arguments, routed as ``module:function(argv) -> int``.
ROUTED = {
    "bench": ("editfleet.workers.bench", "main", "the engine benchmark (see `editfleet bench --help`)"),
    "models": ("editfleet.workers.models.registry", "main", "built-in models: list, convert, path"),
    "demo": ("editfleet.scheduler.demo", "main", "rewrite three facts on a real model, then roll back"),
    "bench-service": ("editfleet.scheduler.bench_dispatch", "main", "submit-to-dispatch latency and jobs/s"),
    "protect-prompts": ("editfleet.workers.evaluation.protect", "main",
                        "write a protected-prompts file from CounterFact or zsRE records"),
}


def _json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


def _state(job: pb.Job) -> str:
    return pb.Job.State.Name(job.state)


def _stage(event: pb.JobEvent) -> str:
    return pb.JobEvent.Stage.Name(event.stage).lower()


def _print_error(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    for field, description in getattr(error, "violations", ()):
        print(f"  {field}: {description}" if field else f"  {description}", file=sys.stderr)
    return 1


class ProgressBar:
    """Job progress on stderr: one line redrawn in place on a terminal, a line per stage otherwise."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width, self.shown, self.stage = width, False, -1
        self.tty = self.stream.isatty()

    def __call__(self, event: pb.JobEvent) -> None:
        step = f" {event.current}/{event.total}" if event.total else ""
        if not self.tty:
            if event.stage != self.stage:
                self.stage = event.stage
                self.stream.write(f"{_stage(event)}{step} {event.message}".rstrip() + "\n")
            return
        done = event.current / event.total if event.total else 0.0
        bar = "#" * int(done * self.width)
        text = f"\r[{bar:<{self.width}}] {_stage(event)}{step} {event.message}"[:120]
        self.stream.write(text.ljust(80))
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _describe_job(job: pb.Job) -> str:
    lines = [f"{job.name}  {_state(job)}  {job.model}  {len(job.edits)} edit(s)"]
    if job.parent_checkpoint:
        lines.append(f"  parent:     {job.parent_checkpoint}")
    if job.checkpoint:
        lines.append(f"  checkpoint: {job.checkpoint}")
    if job.state == pb.Job.FAILED:
        lines.append(f"  error:      {job.error.message}")
    elif job.state == pb.Job.RUNNING:
        lines.append(f"  progress:   {_stage(job.progress)} {job.progress.current}/{job.progress.total}")
    return "\n".join(lines)


def _client(args: argparse.Namespace) -> EditClient:
    return EditClient(args.server, token=args.token)


# -- client commands ------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    edits = read_edits(args.edits)
    settings = json.loads(args.engine_settings) if args.engine_settings else None
    with _client(args) as client:
        job = client.submit(args.model, edits, method=args.method, base_checkpoint=args.base or "",
                            engine_settings=settings, request_id=args.request_id,
                            max_perplexity_increase=args.max_perplexity_increase)
        if args.wait:
            bar = None if args.json else ProgressBar()
            try:
                job = client.wait(job, on_event=bar)
            finally:
                if bar:
                    bar.close()
        print(_json(job) if args.json else _describe_job(job))
    return 1 if job.state == pb.Job.FAILED else 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job)
    print(_json(job) if args.json else _describe_job(job))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for event in client.watch(args.job):
            if args.json:
                print(json_format.MessageToJson(event, preserving_proto_field_name=True, indent=None), flush=True)
            else:
                step = f" {event.current}/{event.total}" if event.total else ""
                extra = f" {event.checkpoint}" if event.checkpoint else ""
                print(f"{pb.Job.State.Name(event.state)} {_stage(event)}{step} {event.message}{extra}".rstrip(), flush=True)
        job = client.job(args.job)
    return 1 if job.state == pb.Job.FAILED else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.jobs(args.model, args.limit)
    if args.json:
        print(json.dumps([json_format.MessageToDict(j, preserving_proto_field_name=True) for j in jobs], indent=2))
    else:
        for job in jobs:
            print(f"{job.name}  {_state(job):9}  {job.model}  {len(job.edits)} edit(s)  {job.checkpoint}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.model(args.model)
        checkpoints = client.checkpoints(args.model)
    if args.json:
        print(json.dumps({"model": json_format.MessageToDict(model, preserving_proto_field_name=True),
                          "checkpoints": [json_format.MessageToDict(c, preserving_proto_field_name=True)
                                          for c in checkpoints]}, indent=2))
        return 0
    print(f"{model.name}  head: {model.head}")
    for c in checkpoints:
        when = c.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        scores = " ".join(f"{k}={v:.4g}" for k, v in sorted(c.scores.items()))
        print(f"{'*' if c.head else ' '} {c.id}  parent {c.parent.rsplit('/', 1)[-1]:16}  {when}  "
              f"{pb.Method.Name(c.method).lower():9}  {len(c.edits)} edit(s)  {scores}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if not args.checkpoint and not args.model:
        raise SystemExit("ask: give --checkpoint ID or --model NAME (its head)")
    target = args.checkpoint or model_name(args.model)
    with _client(args) as client:
        reply = client.query(target, args.prompt, args.target, args.top_k)
    if args.json:
        print(_json(reply))
        return 0
    print(reply.checkpoint)
    for result in reply.results:
        tops = ", ".join(f"{t.token!r} {t.probability:.3f}" for t in result.top_tokens)
        print(f"{result.prompt}\n  next: {tops}")
        for t in result.targets:
            print(f"  P({t.target!r}) = {t.probability:.4g}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        model = client.set_head(args.model, args.to)
    print(f"{model.name}  head: {model.head}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.export(args.checkpoint, str(Path(args.dir).expanduser().resolve()))
    print(f"{reply.checkpoint} -> {reply.output_dir} ({', '.join(reply.files)})")
    return 0


# -- serve ------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _serve_config(args: argparse.Namespace, models: dict[str, Any]):
    from editfleet.scheduler.config import SchedulerConfig

    return SchedulerConfig(
        store_dir=Path(args.store), listen=args.listen, db_path=Path(args.db) if args.db else None, **models,
        ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus, worker_num_cpus=args.worker_cpus,
        worker_threads=args.worker_threads, worker_device=args.worker_device,
        home=Path(args.home) if args.home else None, corpus=[Path(c) for c in args.corpus] if args.corpus else None,
        protect=[Path(c) for c in args.protect] if args.protect else None,
        perplexity_text=Path(args.perplexity_text) if args.perplexity_text else None,
        engine_overrides=json.loads(args.engine_settings) if args.engine_settings else {},
        max_edits_per_job=args.max_edits_per_job, max_batch_edits=args.max_batch_edits,
        token=args.token, log_format=args.log_format, log_level=args.log_level,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from editfleet.scheduler.config import parse_model_spec
    from editfleet.scheduler.server import Scheduler

    models = {"models": dict(parse_model_spec(m) for m in args.model)} if args.model else {}
    try:
        config = _serve_config(args, models)
    except json.JSONDecodeError:
        raise  # main() names --engine-settings
    except (ValueError, OSError) as e:  # a bad setting or file, before anything starts
        return _print_error(e)
    scheduler = Scheduler(config)
    scheduler.start()
    signal.signal(signal.SIGTERM, _interrupt)  # `kubectl delete`, `docker stop`: stop cleanly
    try:
        scheduler.wait()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.stop()
    return 0


# -- parser -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editfleet", description="Knowledge editing as a service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--server", default=os.environ.get("EDITFLEET_SERVER", DEFAULT_SERVER),
                       help=f"scheduler address (default: $EDITFLEET_SERVER or {DEFAULT_SERVER})")
        p.add_argument("--token", default=os.environ.get("EDITFLEET_TOKEN"), help="bearer token (default: $EDITFLEET_TOKEN)")
        p.set_defaults(handler=handler)
        return p

    serve = sub.add_parser("serve", help="run the scheduler (gRPC API, job queue, Ray workers)")
    serve.add_argument("--listen", default=DEFAULT_SERVER, help=f"HOST:PORT (default {DEFAULT_SERVER})")
    serve.add_argument("--store", required=True, help="checkpoint store folder (and job queue)")
    serve.add_argument("--ray-address", help="join this Ray cluster (default: start Ray locally)")
    serve.add_argument("--model", action="append", metavar="NAME[=SOURCE]",
                       help="serve a model (repeatable): built-in NAME, or NAME=FOLDER (default: the built-in models)")
    serve.add_argument("--db", help="job queue SQLite file (default: STORE/jobs.sqlite)")
    serve.add_argument("--home", help="editfleet data folder for model and statistics caches")
    serve.add_argument("--corpus", action="append", help="statistics corpus text file (repeatable; default WikiText-2)")
    serve.add_argument("--protect", action="append",
                       help="protected prompts file, one prompt per line (repeatable): prompts whose continuations "
                            "every edit keeps (engine setting protect_weight; docs/engine.md)")
    serve.add_argument("--perplexity-text", help="text file whose perplexity every checkpoint reports "
                                                 "(default: the held-out head of WikiText-2's test file)")
    serve.add_argument("--engine-settings", help="JSON object of engine settings applied to every job")
    serve.add_argument("--max-edits-per-job", type=int, default=1000)
    serve.add_argument("--max-batch-edits", type=int, default=100, help="coalescing limit per engine batch")
    serve.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    serve.add_argument("--worker-cpus", type=float, default=0, help="CPUs each worker actor reserves")
    serve.add_argument("--worker-threads", type=int, help="torch threads per worker (default: all CPUs of its node)")
    serve.add_argument("--worker-device", choices=("cpu", "cuda"), default="cpu",
                       help="where workers hold the model (cuda: each worker reserves one GPU from Ray)")
    serve.add_argument("--token", default=os.environ.get("EDITFLEET_TOKEN"),
                       help="require this bearer token (default: $EDITFLEET_TOKEN; none: open)")
    serve.add_argument("--log-format", choices=("json", "console"), default="json")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(handler=cmd_serve)

    p = client_command("submit", cmd_submit, "submit an edit job")
    p.add_argument("--model", required=True)
    p.add_argument("--edits", required=True, help="JSON Lines (or a JSON array, e.g. CounterFact/zsRE) of edits")
    p.add_argument("--method", choices=("alphaedit", "memit"), default="alphaedit")
    p.add_argument("--base", help="base checkpoint (default: the model's head when the job runs)")
    p.add_argument("--engine-settings", help="JSON object of engine setting overrides")
    p.add_argument("--max-perplexity-increase", type=float, metavar="FRACTION",
                   help="fail the job, landing nothing, if its checkpoint's held-out perplexity would exceed "
                        "the unedited model's by more than this (0.1 = +10%%)")
    p.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.add_argument("--json", action="store_true")

    p = client_command("status", cmd_status, "show a job")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    p = client_command("watch", cmd_watch, "follow a job's progress until it ends")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")

    p = client_command("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")

    p = client_command("checkpoints", cmd_checkpoints, "list a model's checkpoints (lineage, scores, head)")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")

    p = client_command("ask", cmd_ask, "top next tokens (and target probabilities) on a checkpoint")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--checkpoint", help="checkpoint id or models/M/checkpoints/ID")
    p.add_argument("--model", help="ask the model's head instead")
    p.add_argument("--target", action="append", default=[], help="score this continuation (repeatable)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")

    p = client_command("rollback", cmd_rollback, "move a model's head to a checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--to", required=True, help="checkpoint id ('base': the unedited model)")

    p = client_command("export", cmd_export, "write a checkpoint as a Hugging Face folder")
    p.add_argument("checkpoint")
    p.add_argument("dir", help="new folder (on the worker's host)")

    for name, (_, _, help) in ROUTED.items():
        sub.add_parser(name, help=help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROUTED:
        module, function, _ = ROUTED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (EditFleetError, RecordError) as e:
        return _print_error(e)
    except json.JSONDecodeError as e:
        return _print_error(ValueError(f"--engine-settings is not valid JSON: {e}"))


if __name__ == "__main__":
    sys.exit(main())
