"""The committed generated stubs match the protos (regenerate with scripts/gen_protos.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("editfleet_pb2.py", "editfleet_pb2.pyi", "editfleet_pb2_grpc.py")


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the [dev] extra) is not installed")
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run scripts/gen_protos.sh")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh = (tmp_path / "editfleet" / "v1" / name).read_text()
        committed = (ROOT / "protos" / "editfleet" / "v1" / name).read_text()
        assert fresh == committed, f"protos/editfleet/v1/{name} is stale: run scripts/gen_protos.sh"


def test_generated_package_imports_and_describes_the_service():
    from editfleet.v1 import editfleet_pb2, editfleet_pb2_grpc

    service = editfleet_pb2.DESCRIPTOR.services_by_name["EditService"]
    assert service.full_name == "editfleet.v1.EditService"
    assert {"SubmitEditJob", "WatchJob", "SetHead", "ExportCheckpoint", "Query"} <= {m.name for m in service.methods}
    assert hasattr(editfleet_pb2_grpc, "EditServiceStub")
