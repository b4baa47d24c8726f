"""Starting or joining Ray, quietly.

Locally: no dashboard, a small object store (checkpoints travel through the store folder, not
Ray's object store), worker logs not echoed into the scheduler's structured logs. Ray 2.60
enables token auth by default and writes a token file into the home folder; the embedded
default turns that off unless a token is configured.
"""

from __future__ import annotations

import logging
import os

OBJECT_STORE_BYTES = 256 * 2**20


def init_ray(address: str | None = None, num_cpus: int | None = None, token: str | None = None) -> None:
    """``ray.init`` for the scheduler; a no-op when Ray is already initialised in this process."""
    if token:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token
    elif address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # inherited by local workers: no model hub access
    import ray

    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, **quiet)
    else:
        ray.init(address=address, **quiet)
