"""The checkpoint catalog: content-addressed, atomically written, digest-checked on load.

Layout under the store root::

    models/<model>/HEAD                       the head checkpoint id ("base" when unedited)
    models/<model>/checkpoints/<id>/meta.json lineage, settings, scores, artifact digests
    models/<model>/checkpoints/<id>/<files>   artifacts written by the worker (safetensors)

Torch-free on purpose: the scheduler reads lineage and moves heads through this module, while
only the worker turns artifacts into tensors. A checkpoint folder appears complete or not at
all (written to a temporary sibling, fsynced, renamed), so a crash never leaves half a
checkpoint for a later job to build on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BASE = "base"
"""The id of the unedited model: never stored, always a valid parent and head."""

META = "meta.json"
ID_HEX = 16
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHECKPOINT_ID = re.compile(rf"^([0-9a-f]{{{ID_HEX}}}|{BASE})$")


class StoreError(Exception):
    """Base of the store's errors."""


class CheckpointNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CorruptArtifact(StoreError):
    """An artifact's bytes do not match the digest recorded when it was written."""


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON (sorted keys, no whitespace) so equal content hashes equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_id(model: str, parent: str, edits: Sequence[Mapping[str, Any]], method: str,
                  engine_settings: Mapping[str, Any], engine_version: str) -> str:
    """The id of the checkpoint that these edits, applied to ``parent``, produce.

    Derived from everything that decides the resulting weights, so the same job on the same
    parent yields the same id (and its stored result is reused instead of recomputed).
    """
    identity = {
        "model": model, "parent": parent, "edits": [dict(e) for e in edits], "method": method,
        "engine_settings": dict(engine_settings), "engine_version": engine_version,
    }
    return sha256(canonical_json(identity))[:ID_HEX]


def validate_model_name(model: str) -> None:
    if not _MODEL_NAME.match(model) or ".." in model:
        raise ValueError(f"model name {model!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
                         " starting with a letter or digit")


def is_checkpoint_id(value: str) -> bool:
    return bool(_CHECKPOINT_ID.match(value))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _write_file_synced(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class CheckpointRecord:
    """A stored checkpoint's metadata (the parsed ``meta.json``)."""

    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def parent(self) -> str:
        return self.meta["parent"]

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.meta["artifacts"]


class CheckpointStore:
    """Checkpoints and head pointers of every model under one root folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        validate_model_name(model)
        return self.root / "models" / model

    def checkpoint_dir(self, model: str, ckpt_id: str) -> Path:
        if not is_checkpoint_id(ckpt_id) or ckpt_id == BASE:
            raise CheckpointNotFound(f"{ckpt_id!r} is not a stored checkpoint id ({ID_HEX} hex digits)")
        return self.model_dir(model) / "checkpoints" / ckpt_id

    def models(self) -> list[str]:
        """Models that have a folder in the store (edited at least once or given a head)."""
        folder = self.root / "models"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def exists(self, model: str, ckpt_id: str) -> bool:
        if ckpt_id == BASE:
            return True
        try:
            return (self.checkpoint_dir(model, ckpt_id) / META).is_file()
        except CheckpointNotFound:
            return False

    def write_checkpoint(self, model: str, ckpt_id: str, meta: Mapping[str, Any],
                         files: Mapping[str, bytes]) -> CheckpointRecord:
        """Store a checkpoint's artifacts and metadata as one atomic folder.

        ``meta`` holds the lineage fields (parent, edits, method, engine_settings,
        engine_version, scores); this adds id, model, created time, artifact digests and the
        content digest. If the checkpoint already exists (same content), the stored one wins.
        """
        final = self.checkpoint_dir(model, ckpt_id)
        if (final / META).is_file():
            return self.read(model, ckpt_id)
        for name in files:
            if name == META or "/" in name or name.startswith("."):
                raise ValueError(f"artifact name {name!r} is reserved or not a plain file name")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt_id}.", dir=final.parent))
        try:
            artifacts = {}
            for name, data in sorted(files.items()):
                _write_file_synced(tmp / name, data)
                artifacts[name] = {"sha256": sha256(data), "size_bytes": len(data)}
            record = {
                **dict(meta), "id": ckpt_id, "model": model, "created": time.time(),
                "artifacts": artifacts,
                "content_digest": sha256(canonical_json({n: a["sha256"] for n, a in artifacts.items()})),
            }
            _write_file_synced(tmp / META, json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / META).is_file():  # written concurrently by another worker: same content
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.read(model, ckpt_id)
                raise
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CheckpointRecord(record)

    def read(self, model: str, ckpt_id: str) -> CheckpointRecord:
        path = self.checkpoint_dir(model, ckpt_id) / META
        try:
            meta = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CheckpointNotFound(f"checkpoint {ckpt_id} of model {model} does not exist") from None
        except json.JSONDecodeError as e:
            raise CorruptArtifact(f"{path}: metadata is not valid JSON ({e})") from None
        return CheckpointRecord(meta)

    def read_artifact(self, model: str, ckpt_id: str, name: str) -> bytes:
        """An artifact's bytes, checked against the digest recorded at write time."""
        record = self.read(model, ckpt_id)
        entry = record.artifacts.get(name)
        if entry is None:
            raise CheckpointNotFound(f"checkpoint {ckpt_id} of model {model} has no artifact {name!r}")
        path = self.checkpoint_dir(model, ckpt_id) / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptArtifact(f"{path}: artifact file is missing") from None
        digest = sha256(data)
        if digest != entry["sha256"]:
            raise CorruptArtifact(f"{path}: sha256 {digest} does not match the recorded {entry['sha256']}")
        return data

    def list_checkpoints(self, model: str) -> list[CheckpointRecord]:
        """All stored checkpoints of a model, newest first."""
        folder = self.model_dir(model) / "checkpoints"
        if not folder.is_dir():
            return []
        records = [self.read(model, p.name) for p in folder.iterdir()
                   if p.is_dir() and is_checkpoint_id(p.name) and (p / META).is_file()]
        return sorted(records, key=lambda r: (r.meta["created"], r.id), reverse=True)

    def lineage(self, model: str, ckpt_id: str) -> list[CheckpointRecord]:
        """The chain from the first edit after base to ``ckpt_id`` (empty for base)."""
        chain: list[CheckpointRecord] = []
        seen: set[str] = set()
        while ckpt_id != BASE:
            if ckpt_id in seen:
                raise CorruptArtifact(f"model {model}: checkpoint lineage loops at {ckpt_id}")
            seen.add(ckpt_id)
            record = self.read(model, ckpt_id)
            chain.append(record)
            ckpt_id = record.parent
        return chain[::-1]

    def head(self, model: str) -> str:
        try:
            value = (self.model_dir(model) / "HEAD").read_text().strip()
        except FileNotFoundError:
            return BASE
        if not is_checkpoint_id(value):
            raise CorruptArtifact(f"{self.model_dir(model) / 'HEAD'}: {value!r} is not a checkpoint id")
        return value

    def set_head(self, model: str, ckpt_id: str) -> None:
        if not self.exists(model, ckpt_id):
            raise CheckpointNotFound(f"checkpoint {ckpt_id} of model {model} does not exist")
        atomic_write(self.model_dir(model) / "HEAD", (ckpt_id + "\n").encode())

    def models_holding(self, ckpt_id: str) -> list[str]:
        """Models that have a checkpoint with this id (ids are per model; usually one)."""
        return [m for m in self.models() if self.exists(m, ckpt_id)] if ckpt_id != BASE else []

    def verify(self, model: str, ckpt_id: str, names: Iterable[str] | None = None) -> None:
        """Check every (or the named) artifact's digest; raises ``CorruptArtifact``."""
        record = self.read(model, ckpt_id)
        for name in names if names is not None else record.artifacts:
            self.read_artifact(model, ckpt_id, name)
