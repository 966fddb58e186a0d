#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, make the tiny local chat model, start the
# standalone stack on configs/local.toml (embedded Redis, one worker per model), send a
# streamed chat and an embedding similarity through the queues, print them, and stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python scripts/make_tiny_models.py .smmf/models >/dev/null 2>&1
exec .venv/bin/smmf-queue up --demo "$@"
