"""How calls reach a model replica's workers, kept apart from what a worker does.

Every call is collective: the same method goes to every shard of the replica and the answer
is a list with one entry per shard (vLLM's ``collective_rpc``). A replica is one shard today;
a DeepSpeed-sharded replica becomes another ``Executor`` whose shards run the same calls, not
a rewrite of the scheduler or the worker.

Progress streams back through Ray *streaming generators*: the worker's ``run_edit`` is a
generator, and the actor method that forwards it is called with ``num_returns="streaming"``.
Chosen over a ``ray.util.queue.Queue`` because it needs no extra actor, keeps events in order
with the final result on the same channel, surfaces a worker exception exactly where the stream
ends, and is the same generator the in-process executor iterates directly.

Neither executor imports torch in the calling process: workers are built inside the shard
(``ShardActor``) or, in-process, on first use.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Iterator, Mapping


class WorkerDied(RuntimeError):
    """A shard's process is gone (crashed, killed, failed to load the model)."""


class Executor(ABC):
    """Collective calls to the shards of one replica of one model."""

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every shard; one result per shard, in shard order."""

    @abstractmethod
    def collective_stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Call generator ``method`` on every shard; yield shard 0's items as they come.

        The other shards run the same collective steps; their items are drained, not yielded.
        """

    @abstractmethod
    def shutdown(self) -> None:
        """Release the shards."""


class InProcessExecutor(Executor):
    """One worker in this process (tests, single-process tools).

    Calls are serialised by a lock, as a Ray actor serialises its calls: a worker's model
    weights are shared state.
    """

    def __init__(self, worker_kwargs: Mapping[str, Any]):
        from editfleet.workers.worker import EditWorker

        self._workers = [EditWorker(**worker_kwargs)]
        self._lock = threading.Lock()

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        with self._lock:
            return [getattr(w, method)(*args, **kwargs) for w in self._workers]

    def collective_stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with self._lock:
            yield from getattr(self._workers[0], method)(*args, **kwargs)

    def shutdown(self) -> None:
        self._workers.clear()


class ShardActor:
    """The body of a Ray actor: builds the worker inside the actor's process."""

    def __init__(self, worker_kwargs: Mapping[str, Any]):
        from editfleet.workers.worker import EditWorker

        self.worker = EditWorker(**worker_kwargs)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def stream(self, method: str, args: tuple, kwargs: dict) -> Iterator[Any]:
        yield from getattr(self.worker, method)(*args, **kwargs)


class RayExecutor(Executor):
    """One Ray actor per shard (one shard per replica today).

    Args:
        worker_kwargs: arguments of ``EditWorker``.
        actor_options: Ray actor options (``num_cpus``, ``num_gpus``, ``runtime_env``, ...).
    """

    def __init__(self, worker_kwargs: Mapping[str, Any], actor_options: Mapping[str, Any] | None = None):
        import ray

        actor = ray.remote(ShardActor).options(max_concurrency=1, **dict(actor_options or {}))
        self._actors = [actor.remote(dict(worker_kwargs))]

    def collective_rpc(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        refs = [a.call.remote(method, args, kwargs) for a in self._actors]
        with _unwrapped():
            return ray.get(refs)

    def collective_stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        import ray

        streams = [a.stream.options(num_returns="streaming").remote(method, args, kwargs) for a in self._actors]
        with _unwrapped():
            for ref in streams[0]:
                yield ray.get(ref)
            for other in streams[1:]:
                for ref in other:
                    ray.get(ref)

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()


class _unwrapped:
    """Re-raise a worker's exception as itself (not wrapped in RayTaskError); a lost actor as WorkerDied."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from ray.exceptions import RayActorError, RayTaskError

        if isinstance(exc, RayActorError):
            raise WorkerDied(str(exc)) from exc
        if isinstance(exc, RayTaskError) and isinstance(exc.cause, Exception):
            raise exc.cause from None
        return False
