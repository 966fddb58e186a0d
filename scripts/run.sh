#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, make the chat model's transformers folder from
# its GGUF (once), start the standalone stack on configs/local.toml (embedded Redis, one worker
# per model), send a streamed chat and an embedding similarity through the queues, print them,
# and stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/python -m smmf_queue.offline_models .smmf/models >/dev/null
exec .venv/bin/smmf-queue up --demo "$@"
