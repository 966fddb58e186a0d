"""Counting a chunk's tokens with the model's own tokenizer, where this process can load it.

A chunk's token budget (`--max-tokens`) is what the model will see: counted by the model's
tokenizer it holds exactly. The tokenizer comes from the model's local files: an `hf` model's
folder (transformers' AutoTokenizer) or a `llama.cpp` GGUF's vocabulary (loaded without its
weights). Where neither is here (an API proxy, a model on another host, the package not
installed), `chunks.estimate_tokens` bounds the count from the text's UTF-8 bytes instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..config import ModelConfig
from .chunks import TokenCounter


def model_token_counter(model: ModelConfig) -> TokenCounter | None:
    """The model's own tokenizer as a counter (special tokens included), or None."""
    path = Path(model.path) if model.path else None
    if path is None or not path.exists():
        return None
    if model.provider == "hf" and path.is_dir() and importlib.util.find_spec("transformers"):
        return _hf_counter(path)
    if model.provider == "llama.cpp" and path.is_file() and importlib.util.find_spec("llama_cpp"):
        return _gguf_counter(path)
    return None


def _hf_counter(folder: Path) -> TokenCounter:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _gguf_counter(gguf: Path) -> TokenCounter:
    import llama_cpp

    vocabulary = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocabulary.tokenize(text.encode("utf-8"), add_bos=True))
