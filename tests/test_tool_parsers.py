"""The Hermes tool-call parser (tool_parsers.py) on text as models stream it: any split into
pieces gives the same content and calls."""

from __future__ import annotations

import json

import pytest

from smmf_queue.tool_parsers import HermesParser

REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("size", [1, 2, 5, 11, len(REPLY)])
def test_calls_and_content_whatever_the_pieces(size: int) -> None:
    parser = HermesParser()
    content, calls = [], []
    for start in range(0, len(REPLY), size):
        text, found = parser.feed(REPLY[start:start + size])
        content.append(text)
        calls.extend(found)
    content.append(parser.flush())
    assert "".join(content).strip() == "Let me look."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]
    assert all(c.id and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_text_that_only_looks_like_a_tag_is_content() -> None:
    parser = HermesParser()
    text, calls = parser.feed("a <tool is not <tool_cal")
    assert (text, calls) == ("a <tool is not ", [])
    assert parser.flush() == "<tool_cal"


def test_a_malformed_call_fails_rather_than_passing_as_prose() -> None:
    with pytest.raises(ValueError, match="malformed tool call"):
        HermesParser().feed("<tool_call>{not json}</tool_call>")
