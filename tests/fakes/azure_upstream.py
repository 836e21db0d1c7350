"""A fake Azure OpenAI resource on 127.0.0.1: Azure's paths, query and auth in front of the
OpenAI fake's chat engine (:class:`tests.fakes.upstream.FakeUpstream`, same bodies, streams and
knobs).

Routes:

* ``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` (dated API;
  ``api-version`` required, the deployment must be in ``deployments`` when that is set);
* ``POST /openai/v1/chat/completions`` (v1 API; an ``api-version`` query is rejected, so tests
  notice one being sent);
* ``POST .../embeddings`` next to either chat path: one 3-dimensional vector per input, usage
  ``prompt_tokens`` = number of inputs.

Auth is the ``api-key`` header (``Authorization: Bearer`` is accepted too, as for Entra
tokens); without either: 401 with Azure's body. ``content_filter_next`` answers the next
request with Azure's 400 ``content_filter`` error. Requests are recorded with both credentials
redacted; ``path_qs`` keeps the query.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
from aiohttp import web

from tests.fakes.server import recorded
from tests.fakes.upstream import FakeUpstream, _BadKnob, _error

__all__ = ["CONTENT_FILTER_BODY", "FakeAzure"]

_DEPLOYMENT_RE: Final = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")
_V1_PATHS: Final = ("/openai/v1/chat/completions", "/openai/v1/embeddings")

CONTENT_FILTER_BODY: Final = msgspec.json.encode({"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
    "type": None,
    "param": "prompt",
    "code": "content_filter",
    "status": 400,
    "innererror": {
        "code": "ResponsibleAIPolicyViolation",
        "content_filter_result": {
            "hate": {"filtered": False, "severity": "safe"},
            "jailbreak": {"filtered": True, "detected": True},
            "violence": {"filtered": True, "severity": "medium"},
        },
    },
}})


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=msgspec.json.encode({"error": {"code": code, "message": message}}))


def _embeddings(body: Any) -> web.Response:
    inputs = body.get("input") if isinstance(body, dict) else None
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))]
    return web.Response(content_type="application/json", body=msgspec.json.encode({
        "object": "list", "data": data, "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)}}))


class FakeAzure(FakeUpstream):
    """`base_url` is the resource endpoint (`http://127.0.0.1:<port>`)."""

    _base_path = ""

    def __init__(self, *, deployments: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deployments = deployments
        self.content_filter_next = False

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read() if request.body_exists else b""
        key = request.headers.get("api-key", "")
        bearer = request.headers.get("authorization", "")
        rec = recorded(request, raw, key, secrets=("api-key", "authorization"))
        self.requests.append(rec)
        body = rec.body
        if not key and not bearer.startswith("Bearer "):
            return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint. "
                                "Make sure to provide a valid key for an active subscription.")
        match = _DEPLOYMENT_RE.match(request.path)
        if match is not None:
            if not request.query.get("api-version"):
                return _azure_error(404, "404", "Resource not found")
            if self.deployments and match[1] not in self.deployments:
                return _azure_error(404, "DeploymentNotFound",
                                    "The API deployment for this resource does not exist.")
        elif request.path in _V1_PATHS:
            if "api-version" in request.query:
                return _azure_error(400, "BadRequest", "api-version query parameter is not allowed on the v1 API.")
        else:
            return _azure_error(404, "404", "Resource not found")
        if self.content_filter_next:
            self.content_filter_next = False
            return web.Response(status=400, body=CONTENT_FILTER_BODY, content_type="application/json")
        if request.path.endswith("/embeddings"):
            return _embeddings(body)
        try:
            return await self._chat(request, raw)
        except _BadKnob as exc:
            return _error(400, str(exc))
