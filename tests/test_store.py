"""The checkpoint catalog: content ids, atomic folders, digests checked on load, heads, lineage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from editfleet.workers.store import (BASE, CheckpointNotFound, CheckpointStore, CorruptArtifact, checkpoint_id,
                                     validate_model_name)

EDITS = [{"prompt": "{} is in", "subject": "Eiffel Tower", "target_new": "Rome"}]
SETTINGS = {"layers": [1, 2], "v_max_steps": 5}


def _meta(parent: str = BASE) -> dict:
    return {"parent": parent, "edits": EDITS, "method": "alphaedit", "engine_settings": SETTINGS,
            "engine_version": "1", "scores": {"efficacy": 1.0}, "layers": [1, 2]}


def _write(store: CheckpointStore, parent: str = BASE, payload: bytes = b"delta") -> str:
    ckpt = checkpoint_id("m", parent, EDITS, "alphaedit", SETTINGS, "1")
    store.write_checkpoint("m", ckpt, _meta(parent), {"layer001.safetensors": payload, "layer002.safetensors": b"x"})
    return ckpt


def test_checkpoint_id_is_derived_from_content():
    one = checkpoint_id("m", BASE, EDITS, "alphaedit", SETTINGS, "1")
    assert one == checkpoint_id("m", BASE, [dict(EDITS[0])], "alphaedit", dict(reversed(SETTINGS.items())), "1")
    assert len(one) == 16 and int(one, 16) >= 0
    others = {
        checkpoint_id("m", "0123456789abcdef", EDITS, "alphaedit", SETTINGS, "1"),
        checkpoint_id("other", BASE, EDITS, "alphaedit", SETTINGS, "1"),
        checkpoint_id("m", BASE, EDITS, "memit", SETTINGS, "1"),
        checkpoint_id("m", BASE, EDITS, "alphaedit", {**SETTINGS, "v_max_steps": 6}, "1"),
        checkpoint_id("m", BASE, EDITS, "alphaedit", SETTINGS, "2"),
        checkpoint_id("m", BASE, [{**EDITS[0], "target_new": "Oslo"}], "alphaedit", SETTINGS, "1"),
    }
    assert one not in others and len(others) == 6


def test_write_read_and_metadata(tmp_path):
    store = CheckpointStore(tmp_path)
    ckpt = _write(store)
    record = store.read("m", ckpt)
    assert record.parent == BASE and record.model == "m" and record.id == ckpt
    assert record.meta["edits"] == EDITS and record.meta["scores"] == {"efficacy": 1.0}
    assert set(record.artifacts) == {"layer001.safetensors", "layer002.safetensors"}
    assert len(record.meta["content_digest"]) == 64 and record.meta["created"] > 0
    assert store.read_artifact("m", ckpt, "layer001.safetensors") == b"delta"
    folder = tmp_path / "models" / "m" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == [ckpt]  # no temporary leftovers
    assert json.loads((folder / ckpt / "meta.json").read_text())["id"] == ckpt


def test_rewriting_the_same_checkpoint_keeps_the_stored_one(tmp_path):
    store = CheckpointStore(tmp_path)
    ckpt = _write(store, payload=b"first")
    created = store.read("m", ckpt).meta["created"]
    _write(store, payload=b"second")
    assert store.read_artifact("m", ckpt, "layer001.safetensors") == b"first"
    assert store.read("m", ckpt).meta["created"] == created


def test_corrupted_artifact_is_an_error_naming_the_file(tmp_path):
    store = CheckpointStore(tmp_path)
    ckpt = _write(store)
    path = tmp_path / "models" / "m" / "checkpoints" / ckpt / "layer001.safetensors"
    path.write_bytes(b"delta!")
    with pytest.raises(CorruptArtifact, match="layer001.safetensors.*does not match"):
        store.read_artifact("m", ckpt, "layer001.safetensors")
    with pytest.raises(CorruptArtifact, match="layer001"):
        store.verify("m", ckpt)
    path.unlink()
    with pytest.raises(CorruptArtifact, match="layer001.safetensors: artifact file is missing"):
        store.read_artifact("m", ckpt, "layer001.safetensors")


def test_heads_and_lineage(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.head("m") == BASE and store.lineage("m", BASE) == []
    first = _write(store)
    second = _write(store, parent=first)
    assert [r.id for r in store.lineage("m", second)] == [first, second]
    store.set_head("m", second)
    assert store.head("m") == second
    store.set_head("m", BASE)
    assert store.head("m") == BASE
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        store.set_head("m", "0123456789abcdef")
    assert [r.id for r in store.list_checkpoints("m")] == [second, first]
    assert store.models() == ["m"] and store.models_holding(first) == ["m"]
    assert store.models_holding("0123456789abcdef") == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_model_names_are_checked(name):
    with pytest.raises(ValueError, match="model name"):
        validate_model_name(name)


def test_store_is_torch_free():
    code = "import sys, editfleet.workers.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
