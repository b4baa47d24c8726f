"""In-memory progress events per job, for WatchJob streams.

Progress (optimisation steps, layers) changes many times a second and is worthless after a
restart, so it lives here rather than in SQLite. A watcher that falls more than ``keep``
events behind skips the oldest progress; terminal events are never skipped because a watcher
stops at the last event of a job, which is always its terminal one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """One progress event. ``stage`` is a JobEvent.Stage name, ``state`` a Job.State name."""

    job: str
    state: str
    stage: str
    current: int = 0
    total: int = 0
    message: str = ""
    checkpoint: str = ""
    time: float = field(default_factory=time.time)
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


class EventBus:
    """Publish/wait on per-job event logs, bounded per job and pruned after jobs end."""

    def __init__(self, keep: int = 256, linger_s: float = 600.0):
        self._cond = threading.Condition()
        self._logs: dict[str, deque[Event]] = {}
        self._ended: dict[str, float] = {}
        self._seq = 0
        self._keep = keep
        self._linger_s = linger_s

    def publish(self, event: Event) -> Event:
        with self._cond:
            self._seq += 1
            event = Event(**{**event.__dict__, "seq": self._seq})
            self._logs.setdefault(event.job, deque(maxlen=self._keep)).append(event)
            if event.terminal:
                self._ended[event.job] = event.time
            self._prune(event.time)
            self._cond.notify_all()
            return event

    def cursor(self) -> int:
        """The sequence number of the newest event; a watcher waits for events after it."""
        with self._cond:
            return self._seq

    def latest(self, job: str) -> Event | None:
        with self._cond:
            log = self._logs.get(job)
            return log[-1] if log else None

    def wait(self, job: str, after: int, timeout: float) -> list[Event]:
        """Events of ``job`` newer than ``after``; waits up to ``timeout`` for the first one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                events = [e for e in self._logs.get(job, ()) if e.seq > after]
                remaining = deadline - time.monotonic()
                if events or remaining <= 0:
                    return events
                self._cond.wait(remaining)

    def wake_all(self) -> None:
        """Wake every waiter (shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def _prune(self, now: float) -> None:
        for job, ended in list(self._ended.items()):
            if now - ended > self._linger_s:
                self._logs.pop(job, None)
                del self._ended[job]
