"""Write a tiny GGUF chat model with RANDOM weights, so llama.cpp runs for real in tests.

Usage: python scripts/make_tiny_gguf.py [OUTPUT_FILE]   (default .smmf/models/tiny-noise-chat.gguf)

A llama-architecture model of about 0.5 MB written with the `gguf` package's writer: byte
tokens (`<0x00>`..`<0xFF>`, so any text tokenizes), ChatML special tokens and a ChatML chat
template in the file's metadata. Its text is noise. Output rows of special and non-printable
byte tokens are zero, so generation yields printable ASCII noise and rarely ends by itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

DIM, LAYERS, HEADS, FFN, CONTEXT = 64, 2, 4, 128, 2048
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK, BOS, EOS, IM_START, IM_END = range(len(SPECIALS))
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their types: the special tokens, then one token per byte."""
    tokens = SPECIALS + [f"<0x{byte:02X}>" for byte in range(256)]
    types = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIALS) - 1)
             + [gguf.TokenType.BYTE] * 256)
    return tokens, [int(t) for t in types]


def weights(vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights in llama.cpp's tensor names (numpy shapes are [out, in])."""
    def normal(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    output = normal(vocab_size, DIM, scale=0.5)
    printable = [len(SPECIALS) + byte for byte in range(0x20, 0x7F)]
    mask = np.zeros(vocab_size, dtype=bool)
    mask[printable] = True
    output[~mask] = 0.0
    tensors = {"token_embd.weight": normal(vocab_size, DIM, scale=1.0),
               "output_norm.weight": np.ones(DIM, dtype=np.float32),
               "output.weight": output}
    for layer in range(LAYERS):
        prefix = f"blk.{layer}."
        tensors.update({
            prefix + "attn_norm.weight": np.ones(DIM, dtype=np.float32),
            prefix + "attn_q.weight": normal(DIM, DIM),
            prefix + "attn_k.weight": normal(DIM, DIM),
            prefix + "attn_v.weight": normal(DIM, DIM),
            prefix + "attn_output.weight": normal(DIM, DIM),
            prefix + "ffn_norm.weight": np.ones(DIM, dtype=np.float32),
            prefix + "ffn_gate.weight": normal(FFN, DIM),
            prefix + "ffn_up.weight": normal(FFN, DIM),
            prefix + "ffn_down.weight": normal(DIM, FFN),
        })
    return tensors


def write(path: Path) -> None:
    tokens, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-noise-chat (random weights; its text is noise)")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # for embedding mode; chat ignores it
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(IM_END)
    writer.add_unk_token_id(UNK)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in weights(len(tokens), np.random.default_rng(0)).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else ".smmf/models/tiny-noise-chat.gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # written whole each time: it takes a moment
    write(partial)
    partial.replace(path)
    print(path)


if __name__ == "__main__":
    main()
