"""The edit service's scheduler: gRPC API, durable job queue, dispatch to Ray workers.

Torch-free by design (a test checks): it talks to workers only through ``workers.executor``
and reads lineage through the torch-free ``workers.store``. Start it with ``editfleet serve``
or ``editfleet.scheduler.server.Scheduler``.
"""
