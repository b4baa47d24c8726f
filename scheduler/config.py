"""The scheduler's settings: where state lives, which models it serves, its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editfleet.workers.editing.requests import read_protected_prompts
from editfleet.workers.store import validate_model_name

from .validation import coerce_settings

DEFAULT_MODELS = ("gemma3-270m", "smollm2-135m")


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME`` (a built-in model) or ``NAME=SOURCE`` (a built-in name or a model folder)."""
    name, sep, source = spec.partition("=")
    name, source = name.strip(), (source.strip() if sep else name.strip())
    validate_model_name(name)
    if not source:
        raise ValueError(f"model spec {spec!r}: empty source after '='")
    folder = Path(source).expanduser()
    return name, str(folder.resolve()) if folder.is_dir() else source


@dataclass
class SchedulerConfig:
    """Everything ``editfleet serve`` configures.

    Attributes:
        store_dir: checkpoint store root (shared with the workers).
        models: served model name -> what its workers load (built-in name or folder).
        listen: gRPC address; port 0 picks a free port.
        db_path: the job queue (default ``<store_dir>/jobs.sqlite``).
        ray_address: join this Ray cluster; None starts a local one in-process.
        ray_num_cpus: CPUs of the local Ray (default: all).
        worker_num_cpus: CPUs each worker actor reserves (0: replicas never wait for CPUs).
        worker_threads: torch threads per worker (default: all CPUs of its node).
        worker_device: where workers hold the model: ``cpu`` (default) or ``cuda``; with ``cuda``
            each worker actor reserves one GPU from Ray.
        home: editfleet data folder for the workers (model cache, statistics cache).
        corpus: statistics corpus files for the workers (default: WikiText-2).
        protect: protected prompt files for the workers (one prompt per line; see docs/engine.md).
        perplexity_text: the text whose perplexity every checkpoint reports (default: the
            held-out head of WikiText-2's test file).
        engine_overrides: engine settings applied to every job (before the job's options),
            checked when the config is made.
        max_edits_per_job: submissions with more edits are refused.
        max_batch_edits: coalescing stops adding jobs to a batch at this many edits.
        max_attempts: dispatches of one job across scheduler restarts before it fails.
        token: when set, every call (except health) needs ``authorization: Bearer <token>``.
        dispatch: False accepts and stores jobs without running them (maintenance, tests).
        log_format: ``json`` (default) or ``console``.
        log_level: ``debug``, ``info`` (default), ``warning`` or ``error``.
    """

    store_dir: Path
    models: dict[str, str] = field(default_factory=lambda: {m: m for m in DEFAULT_MODELS})
    listen: str = "127.0.0.1:50051"
    db_path: Path | None = None
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    worker_num_cpus: float = 0
    worker_threads: int | None = None
    worker_device: str = "cpu"
    home: Path | None = None
    corpus: list[Path] | None = None
    protect: list[Path] | None = None
    perplexity_text: Path | None = None
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    max_edits_per_job: int = 1000
    max_batch_edits: int = 100
    max_attempts: int = 3
    token: str | None = None
    dispatch: bool = True
    log_format: str = "json"
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if self.db_path is None:
            self.db_path = self.store_dir / "jobs.sqlite"
        for name in self.models:
            validate_model_name(name)
        if self.max_edits_per_job < 1 or self.max_batch_edits < 1:
            raise ValueError("max_edits_per_job and max_batch_edits must be at least 1")
        if self.protect:
            read_protected_prompts(self.protect)  # a missing or blank file stops serve before Ray starts
        self.engine_overrides = _checked_overrides(self.engine_overrides)
        if self.worker_device not in ("cpu", "cuda"):
            raise ValueError(f"worker_device must be cpu or cuda, got {self.worker_device!r}")
        if self.log_format not in ("json", "console"):
            raise ValueError(f"log_format must be json or console, got {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")

    def worker_kwargs(self, model: str) -> dict[str, Any]:
        """Arguments of ``EditWorker`` for one served model."""
        return {
            "model": self.models[model], "name": model, "store_dir": str(self.store_dir.resolve()),
            "home": str(self.home) if self.home else None,
            "corpus": [str(p) for p in self.corpus] if self.corpus else None,
            "protect": [str(p) for p in self.protect] if self.protect else None,
            "perplexity_text": str(self.perplexity_text) if self.perplexity_text else None,
            "engine_overrides": dict(self.engine_overrides), "threads": self.worker_threads,
            "device": self.worker_device,
        }

    def actor_options(self) -> dict[str, Any]:
        """Ray resources each worker actor reserves."""
        return {"num_cpus": self.worker_num_cpus, **({"num_gpus": 1} if self.worker_device == "cuda" else {})}


def _checked_overrides(overrides: Any) -> dict[str, Any]:
    """Server-wide engine settings, checked by the rules a job's own settings pass: a typo stops
    serve at once instead of failing every job later."""
    if not isinstance(overrides, dict):
        raise ValueError(f"engine settings must be a JSON object, got {type(overrides).__name__}")
    settings, problems = coerce_settings(overrides, "engine_settings")
    if problems:
        raise ValueError("; ".join(f"{path} {why}" if path.startswith("engine_settings.") else why
                                   for path, why in problems))
    return settings
