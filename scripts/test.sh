#!/usr/bin/env bash
# Run the tests: set up .venv if needed, then pytest. The tests start their own Redis on a free
# port and their own worker processes; nothing else needs to run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh hf,llamacpp,proxy,dev
exec .venv/bin/python -m pytest "$@"
