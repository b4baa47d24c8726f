"""Assembling the scheduler: job queue, checkpoint store, Ray workers, gRPC server.

The server registers its handlers from the service descriptor with a lenient request decoder
(``wire.py``) so that undecodable requests get INVALID_ARGUMENT with the field at fault, and
wraps every handler to turn ``ApiError`` into a rich status. The standard health service and
server reflection run beside it (without the token check, so probes need no secret).
"""

from __future__ import annotations

import hmac
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from editfleet.v1 import editfleet_pb2 as pb
from editfleet.workers.executor import Executor, RayExecutor
from editfleet.workers.store import CheckpointStore

from .config import SchedulerConfig
from .dispatcher import Dispatcher
from .errors import ApiError
from .events import EventBus
from .jobstore import JobStore
from .logs import configure, job_logger
from .pool import WorkerPool
from .ray_setup import init_ray
from .service import EditService
from .wire import Undecodable, lenient_deserializer

SERVICE = pb.DESCRIPTOR.services_by_name["EditService"]
SERVICE_NAME = SERVICE.full_name


class Scheduler:
    """The whole service in one process: ``start()``, then ``stop()``.

    Args:
        config: the settings.
        executor_factory: builds a model's replica; default one Ray actor per model
            (starting or joining Ray on ``start``).
    """

    def __init__(self, config: SchedulerConfig, executor_factory: Callable[[str], Executor] | None = None):
        self.config = config
        self._factory = executor_factory
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self.log = structlog.get_logger("editfleet.scheduler")

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Open the queue, recover interrupted jobs, start dispatching and serving; the bound port."""
        cfg = self.config
        configure(cfg.log_format, cfg.log_level)
        cfg.store_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobStore(cfg.db_path)
        self.store = CheckpointStore(cfg.store_dir)
        self.bus = EventBus()
        if self._factory is None and cfg.dispatch:
            init_ray(cfg.ray_address, cfg.ray_num_cpus, cfg.token)
        self.pool = WorkerPool(self._factory or self._ray_replica)
        self.dispatcher = Dispatcher(self.jobs, self.store, self.pool, self.bus, cfg.max_batch_edits)
        requeued, failed = self.jobs.recover(cfg.max_attempts)
        for job in requeued:
            job_logger(job.id, job.model).info("job requeued after restart", attempts=job.attempts)
        for job in failed:
            job_logger(job.id, job.model).warning("job failed after restarts", attempts=job.attempts)

        service = EditService(cfg, self.jobs, self.store, self.bus, self.pool, self.dispatcher, self._stopping.is_set)
        server = grpc.server(ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc"))
        server.add_generic_rpc_handlers((_handlers(service, cfg.token),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(cfg.listen)
        if not self.port:
            raise OSError(f"cannot listen on {cfg.listen}")
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.dispatch:
            self.dispatcher.start()
            self.dispatcher.wake()
        self.log.info("scheduler started", address=self.address, store=str(cfg.store_dir),
                      models=sorted(cfg.models), ray_address=cfg.ray_address, requeued=len(requeued))
        return self.port

    def _ray_replica(self, model: str) -> Executor:
        return RayExecutor(self.config.worker_kwargs(model), self.config.actor_options())

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and dispatching. Running jobs stay RUNNING and re-run at the next start."""
        if self._server is None:
            return
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        self.bus.wake_all()
        self._server.stop(grace).wait()
        self.dispatcher.stop()
        self.pool.shutdown()
        self.jobs.close()
        self._server = None
        self.log.info("scheduler stopped")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


def _handlers(service: EditService, token: str | None) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        impl = getattr(service, method.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _wrap_stream if method.server_streaming else _wrap_unary
        handlers[method.name] = make(wrap(impl, token), request_deserializer=lenient_deserializer(request_cls),
                                     response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _check(request: Any, context: grpc.ServicerContext, token: str | None) -> None:
    if token:
        metadata = dict(context.invocation_metadata())
        if not hmac.compare_digest(metadata.get("authorization", ""), f"Bearer {token}"):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")
    if isinstance(request, Undecodable):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {request.reason}", request.violations)


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if not isinstance(error, ApiError):
        structlog.get_logger("editfleet.scheduler").exception("internal error", method=method)
        error = ApiError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
    context.abort_with_status(error.to_status())


def _wrap_unary(impl: Callable, token: str | None) -> Callable:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check(request, context, token)
            return impl(request, context)
        except Exception as e:
            _abort(context, e, impl.__name__)

    return handler


def _wrap_stream(impl: Callable, token: str | None) -> Callable:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check(request, context, token)
            yield from impl(request, context)
        except Exception as e:
            _abort(context, e, impl.__name__)

    return handler
