#!/usr/bin/env bash
# Create .venv in the repo root and install smmf-queue with the hf extra and the test tools.
# Idempotent: re-installs only when pyproject.toml changed. Used by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=".venv/.installed-$(sha1sum pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (first run takes a few minutes) ..." >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# The CPU build of torch first: a plain `torch` dependency would pull a multi-GB CUDA build.
# Where no CPU wheel of this version is found, point SMMF_TORCH_INDEX at PyTorch's CPU index.
if [ -n "${SMMF_TORCH_INDEX:-}" ]; then
  "${pip[@]}" "torch==2.13.0" --index-url "$SMMF_TORCH_INDEX"
else
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[hf,dev]"
rm -f .venv/.installed-*
touch "$stamp"
