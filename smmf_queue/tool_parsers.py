"""Tool calls in a local model's text, for providers that generate text (`hf`, `vllm`).

A chat template that takes `tools` tells the model how to call one; the model then writes the
call into its reply, and a parser per template family finds it. The family is named in the
model entry, as vLLM's `--tool-call-parser` names it: `tool_parser = "hermes"` for Hermes-style
templates (Qwen2.5 and Qwen3, Hermes, and others), which write

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is the reply's content. A model without `tool_parser` refuses tools
(chat_fields.py): its template might drop them, or its calls would come back as prose.
"""

from __future__ import annotations

import json
import uuid

from .jobs import ToolCallDelta

#: the parsers by name (a model entry's `tool_parser`).
TOOL_PARSERS = frozenset({"hermes"})
OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser:
    """Splits streamed text into content and tool calls (each call whole, once its closing tag
    came), holding back text that might begin a tag."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content safe to emit now, calls completed by this text)."""
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                calls.append(self._call(self._buffer[:end]))
                self._buffer, self._in_call = self._buffer[end + len(CLOSE):], False
                continue
            start = self._buffer.find(OPEN)
            if start < 0:
                keep = _partial_tag(self._buffer)
                content.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            content.append(self._buffer[:start])
            self._buffer, self._in_call = self._buffer[start + len(OPEN):], True
        return "".join(content), calls

    def flush(self) -> str:
        """What is left at the end: held-back text, or an unclosed call as it was written."""
        rest = (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return rest

    def _call(self, body: str) -> ToolCallDelta:
        """One call from the JSON between the tags; text that is not such JSON fails the job
        (a model that writes a malformed call gets no silent prose instead)."""
        try:
            parsed = json.loads(body)
            name, arguments = parsed["name"], parsed.get("arguments", {})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the model wrote a malformed tool call: {body.strip()[:200]!r}") from exc
        index, self.calls = self.calls, self.calls + 1
        return ToolCallDelta(index=index, id=f"call_{uuid.uuid4().hex[:24]}", name=str(name),
                             arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins the opening tag."""
    for size in range(min(len(text), len(OPEN) - 1), 0, -1):
        if text.endswith(OPEN[:size]):
            return size
    return 0
