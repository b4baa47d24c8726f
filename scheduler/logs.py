"""Structured logs (structlog): JSON lines by default, each bound to job, model and checkpoint."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "json", level: str = "info", stream=None) -> None:
    """Route structlog to ``stream`` (default stderr) as JSON lines or readable console lines."""
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def job_logger(job: str, model: str, checkpoint: str = "") -> structlog.typing.FilteringBoundLogger:
    """A logger whose every line names the job, its model and the checkpoint it concerns."""
    return structlog.get_logger("editfleet.scheduler").bind(job=job, model=model, checkpoint=checkpoint)
