#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go, the open question first: the GPU tests (the hf
# provider on `cuda` through the queue, the vLLM refusals on a GPU host, the extras' imports),
# then embed-batch against sentence-transformers in pairs of fresh processes (issue #20's GPU
# figure: one process's rate differs from the next one's there), then the dispatch and
# embedding benchmarks with the models on the GPU, dispatch once more on this host's CPUs, the
# scale-out curve on its cores, and the embedding profile (py-spy): about 9 minutes on an H200
# host with 16 cores before the pairs came first. Each figure prints as it is measured;
# EMBED_PAIRS sets the pairs (6), ONLY=pairs stops after them. CI has no GPU; run this where one
# is lent, with smmf-queue and the `hf` extra importable by $PYTHON (default .venv/bin/python):
# scripts/gpu_carry.sh says how.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"
# The benchmarks run even when a test fails (a lent machine's time is short); the tests decide
# the exit status.
tests=0
"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engines.py tests/test_extras.py \
  || tests=$?
"$python" scripts/bench_embed.py --n "${EMBED_N:-20000}" --device cuda --pairs "${EMBED_PAIRS:-6}"
[ "${ONLY:-}" = pairs ] && exit "$tests"
"$python" scripts/bench_dispatch.py --n "${DISPATCH_N:-200}" --device cuda
"$python" scripts/bench_dispatch.py --n "${DISPATCH_N:-200}" --device cpu
"$python" scripts/bench_embed.py --n "${EMBED_N:-20000}" --device cuda
"$python" scripts/bench_gateway_load.py --curve --n 2000 --clients 128 --client-procs 4
"$python" scripts/profile_embed.py --n "${EMBED_N:-20000}" --device cuda --rate 40 --out "${OUT:-profiles}"
exit "$tests"
