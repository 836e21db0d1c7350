"""Byte builders for the OpenAI Chat Completions wire shapes the fake upstream serves.

Everything here is pure: a function of its arguments, no clock reads, no IO. The server
module supplies ids and timestamps. Bodies follow what api.openai.com sends (field names,
field order, ``null`` placeholders), so a gateway that parses them parses the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

_encode = msgspec.json.encode

SYSTEM_FINGERPRINT = "fp_fake0001"
DONE_EVENT = b"data: [DONE]\n\n"

#: The answer is this vocabulary cycled; word i of every answer is ``VOCABULARY[i % len]``.
VOCABULARY = (
    "Alephant",
    "fake",
    "upstream",
    "answers",
    "quickly",
    "and",
    "deterministically",
    "for",
    "gateway",
    "tests",
    "with",
    "counted",
    "tokens",
    "per",
    "word",
    "emitted.",
)

#: Model ids listed by ``GET /v1/models``; chat completions accept any model string.
LISTED_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano", "o3-mini")

_ERROR_DEFAULTS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: (
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        "invalid_api_key",
    ),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Request timed out.", "timeout", None),
    409: ("Conflict.", "invalid_request_error", None),
    422: ("Unprocessable entity.", "invalid_request_error", None),
    429: (
        "Rate limit reached for requests. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
    504: ("Gateway timeout.", "server_error", None),
}


def error_body(
    status: int,
    message: str | None = None,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """The OpenAI error envelope ``{"error": {message, type, param, code}}`` for ``status``.

    Unset fields take the defaults api.openai.com uses for that status; unknown statuses get
    a ``server_error`` (>= 500) or ``invalid_request_error`` (< 500) envelope.
    """
    default_message, default_type, default_code = _ERROR_DEFAULTS.get(
        status,
        (f"Upstream error {status}.", "server_error" if status >= 500 else "invalid_request_error", None),
    )
    return _encode(
        {
            "error": {
                "message": message if message is not None else default_message,
                "type": type_ if type_ is not None else default_type,
                "param": param,
                "code": code if code is not None else default_code,
            }
        }
    )


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
        return total
    return 0


def count_prompt_tokens(messages: list[Any]) -> int:
    """Deterministic prompt size: per message ``3 + ceil(chars / 4)`` of its text content.

    Text is the string content, or the ``text`` of each part of a content list; other parts
    (images, audio) and non-dict messages count only the 3-token overhead.
    """
    total = 0
    for message in messages:
        chars = _text_chars(message.get("content")) if isinstance(message, dict) else 0
        total += 3 + (chars + 3) // 4
    return total


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The ``usage`` object, including the details objects OpenAI always sends today."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """A precomputed answer of ``len(pieces)`` words.

    ``pieces[i]`` is the text of stream delta ``i`` (leading space from the second word on),
    so ``"".join(pieces) == content``. ``delta_choices[i]`` is the encoded ``choices[0]`` of
    the stream chunk carrying ``pieces[i]``.
    """

    content: str
    pieces: tuple[str, ...]
    delta_choices: tuple[bytes, ...]

    @classmethod
    def of_words(cls, words: int) -> Answer:
        """Build the answer of ``words`` words (0 gives an empty answer)."""
        pieces = tuple(
            (VOCABULARY[i % len(VOCABULARY)] if i == 0 else " " + VOCABULARY[i % len(VOCABULARY)])
            for i in range(max(words, 0))
        )
        choices = tuple(
            b'{"index":0,"delta":{"content":' + _encode(piece) + b'},"logprobs":null,"finish_reason":null}'
            for piece in pieces
        )
        return cls(content="".join(pieces), pieces=pieces, delta_choices=choices)

    def prefix(self, emitted: int) -> str:
        """The content of the first ``emitted`` words."""
        return "".join(self.pieces[:emitted])


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage_obj: dict[str, Any],
) -> bytes:
    """A non-streaming ``chat.completion`` body."""
    return _encode(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage_obj,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


_ROLE_CHOICE = (
    b'{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}'
)


class ChunkFramer:
    """Frames ``chat.completion.chunk`` SSE events for one stream.

    The per-stream header (id, created, model) is encoded once; each event is then a byte
    concatenation. When ``include_usage`` is true every chunk carries ``"usage":null`` and
    :meth:`usage_event` yields the final ``choices: []`` chunk, as OpenAI does.
    """

    __slots__ = ("_head", "_tail")

    def __init__(self, *, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":'
            + _encode(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(model)
            + b',"service_tier":"default","system_fingerprint":"'
            + SYSTEM_FINGERPRINT.encode()
            + b'","choices":['
        )
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def event(self, choice: bytes) -> bytes:
        """One ``data:`` event whose ``choices`` holds the encoded ``choice``."""
        return self._head + choice + self._tail

    def role_event(self) -> bytes:
        """The first event: the assistant role delta with empty content."""
        return self._head + _ROLE_CHOICE + self._tail

    def finish_event(self, finish_reason: str) -> bytes:
        """The event with an empty delta and the ``finish_reason``."""
        return (
            self._head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + _encode(finish_reason)
            + b"}"
            + self._tail
        )

    def usage_event(self, usage_obj: dict[str, Any]) -> bytes:
        """The trailing ``"choices": []`` event with ``usage`` (include_usage streams only)."""
        return self._head + b'],"usage":' + _encode(usage_obj) + b"}\n\n"


def models_body(created: int) -> bytes:
    """The ``GET /v1/models`` list."""
    return _encode(
        {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": created, "owned_by": "system"} for model in LISTED_MODELS
            ],
        }
    )
