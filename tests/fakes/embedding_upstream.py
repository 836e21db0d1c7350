"""A scripted OpenAI-compatible embeddings upstream whose geometry a semantic-cache test can rely on.

Endpoint: ``POST /v1/embeddings`` (``base_url`` ends in ``/v1``, like the OpenAI SDK's). Every
request needs ``Authorization: Bearer <anything>``, else 401 ``invalid_api_key``. The body is
OpenAI's: ``model``, ``input`` (a string or a list of strings), ``encoding_format`` (``float``,
the default, or ``base64``: little-endian float32, as api.openai.com sends) and ``dimensions``
(default ``dim``, 64). The answer is OpenAI's ``{"object": "list", "data": [{"object":
"embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``, with
``prompt_tokens`` the sum over the inputs of ``max(1, ceil(chars / 4))`` (about what OpenAI's
tokenizer gives English text).

Geometry (:meth:`EmbeddingUpstream.vector`, a pure function of the text and the dimension):

* ``topics`` maps a topic name to its keywords (lower-case words). A text's words are its runs of
  letters and digits, lower-cased; a topic is present when one of its keywords is.
* The i-th topic's vector is the i-th unit basis vector (topics past the dimension get a unit
  vector from a hash of their name), so distinct topics are orthogonal.
* A text's vector is the normalised sum of its topics' vectors plus ``noise`` (default 0.05)
  times a unit vector from a hash of the whitespace-normalised, lower-cased text. Paraphrases
  (same topics, other words) therefore have cosine ~0.99; texts sharing one of two topics ~0.5;
  texts with no topic in common ~0.
* A text with no known topic is its hash vector alone: far from everything (cosine about
  N(0, 1/dim) with any other vector).

The default topics (:data:`TOPICS`) cover the examples the tests use (capital cities, France,
weather, Python, sorting, pasta, refunds, passwords, shipping...); pass ``topics`` to replace
them or call :meth:`EmbeddingUpstream.add_topic`.

Counters and knobs: ``calls`` counts ``POST /v1/embeddings`` requests on arrival, ``inputs`` the
texts embedded; ``requests`` records each request (Authorization redacted). ``latency_ms`` delays
every answer; ``fail_next(status)`` queues error answers (OpenAI's error envelope); ``fail_status``
fails every request while set. ``clear()`` resets the counters, records and failures.
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import math
import re
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.openai_bodies import error_body
from tests.fakes.server import FakeServer, RecordedRequest, recorded

__all__ = ["TOPICS", "EmbeddingUpstream", "cosine"]

TOPICS: Final[Mapping[str, frozenset[str]]] = {
    "capital": frozenset({"capital", "capitals", "capitol"}),
    "france": frozenset({"france", "french", "paris"}),
    "germany": frozenset({"germany", "german", "berlin"}),
    "weather": frozenset({"weather", "forecast", "rain", "raining", "sunny", "temperature"}),
    "python": frozenset({"python", "py", "pythonic"}),
    "sorting": frozenset({"sort", "sorting", "sorted", "sorts"}),
    "pasta": frozenset({"pasta", "spaghetti", "carbonara", "noodles", "lasagna"}),
    "cooking": frozenset({"recipe", "cook", "cooking", "bake", "baking", "prepare"}),
    "refund": frozenset({"refund", "refunds", "reimburse", "reimbursement", "money"}),
    "password": frozenset({"password", "passwords", "login", "credentials", "passcode"}),
    "shipping": frozenset({"shipping", "delivery", "deliver", "parcel", "package", "shipment"}),
    "translation": frozenset({"translate", "translation", "translating", "spanish"}),
}

_WORD: Final = re.compile(r"[a-z0-9]+")
_JSON: Final = "application/json"
_REDACTED: Final = "Bearer <redacted>"
MAX_DIMENSIONS: Final = 4096


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two equal-length vectors (0 when either is zero)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def _hash_unit(seed: str, dim: int) -> list[float]:
    raw = hashlib.shake_256(seed.encode()).digest(4 * dim)
    values = [int.from_bytes(raw[4 * i:4 * i + 4], "little") / 2**31 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _float32_base64(vector: list[float]) -> str:
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


class EmbeddingUpstream(FakeServer):
    """The fake on ``host:port`` (port 0: a free one, known after ``start``). Use it from the loop
    that started it. Knobs are read on every request."""

    _base_path = "/v1"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, dim: int = 64, noise: float = 0.05,
                 topics: Mapping[str, frozenset[str]] | None = None, latency_ms: float = 0.0,
                 max_recorded: int = 1000) -> None:
        if not 1 <= dim <= MAX_DIMENSIONS:
            raise ValueError(f"dim must be 1..{MAX_DIMENSIONS}, got {dim}")
        self.host = host
        self.port = port
        self.dim = dim
        self.noise = noise
        self.topics: dict[str, frozenset[str]] = dict(TOPICS if topics is None else topics)
        self.latency_ms = latency_ms
        self.max_recorded = max_recorded
        self.fail_status: int | None = None
        self.calls = 0
        self.inputs = 0
        self.requests: list[RecordedRequest] = []
        self._failures: deque[int] = deque()

    # -- geometry --------------------------------------------------------------------------------

    def add_topic(self, name: str, keywords: Sequence[str]) -> None:
        """A new topic (after the others: its basis vector is the next free one)."""
        self.topics[name] = frozenset(k.lower() for k in keywords)

    def topics_of(self, text: str) -> list[str]:
        """The topics present in `text`, in table order."""
        words = set(_WORD.findall(text.lower()))
        return [name for name, keywords in self.topics.items() if words & keywords]

    def _topic_vector(self, index: int, name: str, dim: int) -> list[float]:
        if index < dim:
            return [1.0 if i == index else 0.0 for i in range(dim)]
        return _hash_unit(f"topic:{name}", dim)

    def vector(self, text: str, dim: int | None = None) -> list[float]:
        """The unit vector the fake answers for `text` (see the module docstring)."""
        dim = self.dim if dim is None else dim
        noise = _hash_unit("text:" + " ".join(text.lower().split()), dim)
        present = set(self.topics_of(text))
        if not present:
            return noise
        total = [self.noise * v for v in noise]
        for index, name in enumerate(self.topics):
            if name in present:
                for i, v in enumerate(self._topic_vector(index, name, dim)):
                    total[i] += v
        norm = math.sqrt(sum(v * v for v in total)) or 1.0
        return [v / norm for v in total]

    @staticmethod
    def tokens(text: str) -> int:
        """The prompt tokens counted for one input."""
        return max(1, math.ceil(len(text) / 4))

    # -- controls --------------------------------------------------------------------------------

    def fail_next(self, status: int, *, count: int = 1) -> None:
        """Answer the next `count` embedding requests with `status` and OpenAI's error body."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next status must be 4xx or 5xx, got {status}")
        self._failures.extend([status] * count)

    def clear(self) -> None:
        """Forget counters, recorded requests and queued failures; `fail_status` off."""
        self.calls = self.inputs = 0
        self.requests.clear()
        self._failures.clear()
        self.fail_status = None

    # -- serving ---------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/v1/embeddings" or request.method != "POST":
            return _error(404, f"Invalid URL ({request.method} {request.path})")
        self.calls += 1
        raw = await request.read()
        auth = request.headers.get("Authorization", "")
        key = auth[7:].strip() if auth.startswith("Bearer ") else ""
        self.requests.append(recorded(request, raw, key, mask=_REDACTED))
        del self.requests[:-self.max_recorded]
        if not key:
            return _error(401, "You didn't provide an API key.", code="invalid_api_key")
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        status = self._failures.popleft() if self._failures else self.fail_status
        if status is not None:
            return _error(status)
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        return self._answer(body)

    def _answer(self, body: Any) -> web.Response:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "you must provide a model parameter", param="model")
        raw_input = body.get("input")
        inputs = [raw_input] if isinstance(raw_input, str) else raw_input
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
            return _error(400, "'input' must be a non-empty string or array of non-empty strings.", param="input")
        dim = body.get("dimensions", self.dim)
        if not isinstance(dim, int) or not 1 <= dim <= MAX_DIMENSIONS:
            return _error(400, f"'dimensions' must be an integer in 1..{MAX_DIMENSIONS}.", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        self.inputs += len(inputs)
        data = []
        for i, text in enumerate(inputs):
            vector = self.vector(text, dim)
            data.append({"object": "embedding", "index": i,
                         "embedding": _float32_base64(vector) if as_base64 else vector})
        tokens = sum(self.tokens(t) for t in inputs)
        answer = {"object": "list", "data": data, "model": body["model"],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=msgspec.json.encode(answer), content_type=_JSON)


def _error(status: int, message: str | None = None, *, param: str | None = None,
           code: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, param=param, code=code), content_type=_JSON)
