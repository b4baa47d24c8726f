"""One warm replica per served model, created on first use."""

from __future__ import annotations

import threading
from typing import Callable

from editfleet.workers.executor import Executor


class WorkerPool:
    """Replicas by model name. Different models live on different workers and run in parallel."""

    def __init__(self, factory: Callable[[str], Executor]):
        self._factory = factory
        self._replicas: dict[str, Executor] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> tuple[Executor, bool]:
        """The model's replica, and whether it was just created (its first call loads the model)."""
        with self._lock:
            if model in self._replicas:
                return self._replicas[model], False
            replica = self._replicas[model] = self._factory(model)
            return replica, True

    def drop(self, model: str) -> None:
        """Forget a replica whose worker died; the next use starts a new one."""
        with self._lock:
            replica = self._replicas.pop(model, None)
        if replica is not None:
            replica.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            replicas, self._replicas = list(self._replicas.values()), {}
        for replica in replicas:
            replica.shutdown()
