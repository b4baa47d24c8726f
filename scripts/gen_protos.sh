#!/usr/bin/env bash
# Regenerate the committed Python stubs of protos/editfleet/v1 (tests/test_protos.py checks they match).
# Needs grpcio-tools (the [dev] extra). Usage: scripts/gen_protos.sh [OUT_ROOT]  (default: protos)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos}"
python="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
"$python" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/editfleet/v1/*.proto
