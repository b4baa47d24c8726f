"""Turning queued jobs into engine batches on workers, in order per model, models in parallel.

Rules:
- A model has at most one batch running: its jobs apply in submission order, each on the
  checkpoint the previous one produced (an empty base means the head at dispatch time).
- Queued jobs at the front of a model's queue that share base, method and options coalesce
  into one batch (up to ``max_batch_edits`` edits): one engine run, ONE checkpoint that all of
  them report. Only a contiguous run coalesces, so order is never changed.
- A successful batch moves the model's head to its checkpoint. A failed one leaves the head;
  so does one whose result breaks its jobs' ``max_perplexity_increase`` (they fail, naming it).
  If the engine refuses some edits of a coalesced batch, their jobs fail with the field
  violations and the other jobs go back to the queue (they run next, without them).
- Stopping the scheduler leaves running jobs RUNNING in the queue: the next start re-dispatches
  them (``JobStore.recover``); checkpoint ids come from content, so a re-run reuses a result
  that was already stored.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from editfleet.workers.executor import WorkerDied
from editfleet.workers.store import CheckpointStore, StoreError

from .events import Event, EventBus
from .jobstore import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, JobStore
from .logs import job_logger
from .pool import WorkerPool


class Stopped(Exception):
    """The scheduler stopped while a batch ran; its jobs stay RUNNING for the next start."""


class Busy(Exception):
    """A model has a running batch (its head cannot move now)."""


@dataclass(frozen=True)
class Batch:
    id: str
    model: str
    parent: str
    jobs: list[JobRecord]
    method: str
    options: dict[str, Any]

    @property
    def edits(self) -> list[dict[str, Any]]:
        return [e for job in self.jobs for e in job.edits]


def _compatible_key(job: JobRecord) -> tuple[str, str, str]:
    return job.base_checkpoint, job.method, json.dumps(job.options, sort_keys=True)


class Dispatcher:
    """The dispatch loop and the batch runners (threads), see the module docstring."""

    def __init__(self, jobs: JobStore, store: CheckpointStore, pool: WorkerPool, bus: EventBus,
                 max_batch_edits: int, max_parallel: int = 8):
        self.jobs, self.store, self.pool, self.bus = jobs, store, pool, bus
        self.max_batch_edits = max_batch_edits
        self._lock = threading.Lock()        # guards _busy, dispatch, cancel, head moves, _stopped
        self._busy: set[str] = set()
        self._stopped = False
        self._wake = threading.Event()
        self._runners = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="batch")
        self._thread = threading.Thread(target=self._loop, name="dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Stop dispatching; running batches are abandoned (their jobs stay RUNNING)."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._runners.shutdown(wait=False, cancel_futures=True)

    # -- operations that must not race with dispatch ------------------------------------------

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            if not self.jobs.cancel(job_id):
                return False
        job = self.jobs.get(job_id)
        self.bus.publish(Event(job=job_id, state=CANCELLED, stage="CANCELLED", message="cancelled by request"))
        job_logger(job_id, job.model).info("job cancelled")
        return True

    def set_head(self, model: str, ckpt_id: str) -> None:
        with self._lock:
            if model in self._busy:
                raise Busy(f"model {model} has a running edit job; its head moves when the job ends")
            self.store.set_head(model, ckpt_id)

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._lock:
                if self._stopped:
                    return
                batches = []
                for model in self.jobs.models_with_queued():
                    if model in self._busy:
                        continue
                    try:
                        batch = self._take(model)
                    except Exception:  # keep dispatching the other models
                        structlog.get_logger("editfleet.scheduler").exception("dispatch failed", model=model)
                        continue
                    if batch is not None:
                        batches.append(batch)
                        self._busy.add(model)
            for batch in batches:
                self._runners.submit(self._run, batch)

    def _take(self, model: str) -> Batch | None:
        """The next batch of a model (marked RUNNING), or None when it has no queued job."""
        queued = self.jobs.queued(model)
        if not queued:
            return None
        key, chosen, edits = _compatible_key(queued[0]), [], 0
        for job in queued:
            if _compatible_key(job) != key or (chosen and edits + len(job.edits) > self.max_batch_edits):
                break
            chosen.append(job)
            edits += len(job.edits)
        first = chosen[0]
        try:
            parent = first.base_checkpoint or self.store.head(model)
        except StoreError as e:
            error = {"message": f"cannot read the head of model {model}: {e}"}
            self.jobs.finish([j.id for j in chosen], FAILED, error=error)
            for job in chosen:
                self._publish(job.id, "FAILED", state=FAILED, message=error["message"])
            return None
        batch = Batch(uuid.uuid4().hex[:16], model, parent, chosen, first.method, first.options)
        self.jobs.mark_running([j.id for j in chosen], batch.id, parent)
        for job in chosen:
            job_logger(job.id, model, parent).info("job dispatched", batch=batch.id, batch_jobs=len(chosen),
                                                   batch_edits=edits, attempt=job.attempts + 1)
            self._publish(job.id, "DISPATCHED", message=f"batch {batch.id}: {len(chosen)} job(s), {edits} edit(s)")
        return batch

    # -- running a batch ------------------------------------------------------------------------

    def _run(self, batch: Batch) -> None:
        try:
            try:
                self._execute(batch)
            except WorkerDied as e:
                self.pool.drop(batch.model)
                self._fail(batch.jobs, batch.parent, {"message": f"the model's worker died: {e}"})
            except Stopped:
                raise
            except Exception as e:  # the engine's or the store's error: the jobs fail with the reason
                self._fail(batch.jobs, batch.parent, {"message": f"{type(e).__name__}: {e}"})
        except Stopped:
            pass
        finally:
            with self._lock:
                self._busy.discard(batch.model)
            self._wake.set()

    def _execute(self, batch: Batch) -> None:
        replica, fresh = self.pool.get(batch.model)
        if fresh:
            self._progress(batch, "LOADING", message="loading the model")
            replica.collective_rpc("describe")
        settings = batch.options.get("engine_settings", {})
        limit = batch.options.get("max_perplexity_increase")
        stage = ""
        for event in replica.collective_stream("run_edit", batch.parent, batch.edits, batch.method, settings, limit):
            kind = event["kind"]
            if kind == "progress":
                name = event["stage"].upper()
                if name != stage:
                    stage = name
                    self._guarded(lambda: self.jobs.set_stage([j.id for j in batch.jobs], name))
                self._progress(batch, name, event["current"], event["total"])
            elif kind == "result":
                self._succeed(batch, event)
                return
            elif kind == "rejected":
                self._rejected(batch, event)
                return
            elif kind == "over_limit":  # every job of the batch asked for the same limit
                self._fail(batch.jobs, batch.parent, {"message": event["message"],
                                                      "violations": [(f"options.{event['field']}", event["message"])]})
                return
        raise RuntimeError("the worker's stream ended without a result")

    def _succeed(self, batch: Batch, result: dict[str, Any]) -> None:
        ckpt = result["checkpoint"]
        name = f"models/{batch.model}/checkpoints/{ckpt}"
        with self._lock:
            if self._stopped:
                raise Stopped
            self.store.set_head(batch.model, ckpt)
            self.jobs.finish([j.id for j in batch.jobs], SUCCEEDED, checkpoint=ckpt,
                             message="reused a stored checkpoint" if result["reused"] else "")
        for job in batch.jobs:
            job_logger(job.id, batch.model, ckpt).info("job succeeded", parent=batch.parent, reused=result["reused"],
                                                       scores=result["scores"], batch=batch.id)
            self._publish(job.id, "DONE", state=SUCCEEDED, checkpoint=name)

    def _rejected(self, batch: Batch, event: dict[str, Any]) -> None:
        """Fail the jobs owning refused edits (violations re-indexed to each job); requeue the rest."""
        owners: list[tuple[JobRecord, int]] = []
        for job in batch.jobs:
            owners.extend((job, i) for i in range(len(job.edits)))
        per_job: dict[str, list[tuple[str, str]]] = {}
        for v in event["violations"]:
            job, local = owners[v["index"]] if 0 <= v["index"] < len(owners) else (batch.jobs[0], v["index"])
            field = f"edits[{local}].{v['field']}" if v["field"] != "edits" else "edits"
            per_job.setdefault(job.id, []).append((field, v["description"]))
        bad = [j for j in batch.jobs if j.id in per_job] or batch.jobs
        good = [j for j in batch.jobs if j not in bad]
        for job in bad:
            violations = per_job.get(job.id, [])
            message = "the engine refused the edits: " + "; ".join(f"{f}: {d}" for f, d in violations) if violations \
                else event["message"]
            self._fail([job], batch.parent, {"message": message, "violations": violations})
        if good:
            self._guarded(lambda: self.jobs.requeue([j.id for j in good], "requeued: another job of its batch was refused"))
            for job in good:
                self._publish(job.id, "QUEUED", state=QUEUED, message="requeued: another job of its batch was refused")

    def _fail(self, jobs: list[JobRecord], parent: str, error: dict[str, Any]) -> None:
        self._guarded(lambda: self.jobs.finish([j.id for j in jobs], FAILED, error=error))
        for job in jobs:
            job_logger(job.id, job.model, parent).warning("job failed", reason=error["message"])
            self._publish(job.id, "FAILED", state=FAILED, message=error["message"])

    def _guarded(self, write) -> None:
        """Write to the queue unless the scheduler stopped (then the jobs stay as they are)."""
        with self._lock:
            if self._stopped:
                raise Stopped
            write()

    def _progress(self, batch: Batch, stage: str, current: int = 0, total: int = 0, message: str = "") -> None:
        for job in batch.jobs:
            self._publish(job.id, stage, current, total, message=message)

    def _publish(self, job_id: str, stage: str, current: int = 0, total: int = 0, *, state: str = RUNNING,
                 message: str = "", checkpoint: str = "") -> None:
        self.bus.publish(Event(job=job_id, state=state, stage=stage, current=current, total=total,
                               message=message, checkpoint=checkpoint))
