#!/usr/bin/env bash
# Regenerates the Python stubs (and .pyi types) for protos/loraplex/v1 into loraplex/v1/.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: repo root; used by `make proto-check` with a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
py=${PYTHON:-.venv/bin/python}
export PATH="$(cd "$(dirname "$py")" && pwd):$PATH"  # protoc-gen-mypy lives beside the interpreter
mkdir -p "$out/loraplex/v1"
rm -f "$out"/loraplex/v1/*_pb2*.py "$out"/loraplex/v1/*_pb2*.pyi
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/loraplex/v1/*.proto
printf '"""Generated gRPC contracts (protos/loraplex). Do not edit: run `make proto`."""\n' >"$out/loraplex/__init__.py"
printf '"""Generated from protos/loraplex/v1. Do not edit: run `make proto`."""\n' >"$out/loraplex/v1/__init__.py"
touch "$out/loraplex/py.typed"
