"""Azure OpenAI: the OpenAI adapter with Azure's URLs, `api-key` auth and content-filter errors.

Everything on the wire after the URL and headers is OpenAI Chat Completions, so this adapter
only overrides the OpenAI adapter's request builder (`_request`) and error mapper; bodies,
streams, usage and embeddings are the OpenAI adapter's.

Provider configuration:
    base_url                the resource endpoint, `https://{resource}.openai.azure.com`
                            (a trailing `/openai` or `/openai/v1` is accepted; the latter
                            selects the v1 API)
    options["api"]          `v1` for the v1 API: `{base}/openai/v1/chat/completions`, no
                            api-version, the model id is the deployment name
    options["deployment"]   dated API: the deployment (default: the model id)
    options["api_version"]  dated API: `api-version` query value (default DEFAULT_API_VERSION)
    options["auth"]         `bearer` sends the key as `Authorization: Bearer` (a Microsoft
                            Entra token); otherwise it is sent as `api-key`
    dated API URL           `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`

A 400 with `error.code == "content_filter"` (Azure's prompt filter) becomes a 400 with code
`content_filter` naming the filtered categories. Other errors use the shared status table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import msgspec

from dataplane.providers.base import UpstreamCall
from dataplane.providers.openai import OpenAIProvider
from dataplane.providers.upstream import map_upstream_error, provider_message
from schemas.errors import GatewayError, InvalidRequest, UpstreamError

DEFAULT_API_VERSION = "2024-10-21"

_any_decoder = msgspec.json.Decoder()


def azure_chat_url(call: UpstreamCall) -> str:
    """The chat-completions URL for the provider's options (see the module docstring)."""
    opts = call.provider.options
    base = call.provider.base_url.strip().rstrip("/")
    if not base:
        raise UpstreamError(f"Provider '{call.provider.name}' needs a base_url (https://<resource>.openai.azure.com).",
                            code="provider_misconfigured")
    v1 = opts.get("api") == "v1"
    if base.endswith("/openai/v1"):
        base, v1 = base[: -len("/openai/v1")], True
    elif base.endswith("/openai"):
        base = base[: -len("/openai")]
    if v1:
        return f"{base}/openai/v1/chat/completions"
    deployment = opts.get("deployment") or call.model
    version = opts.get("api_version") or DEFAULT_API_VERSION
    return (f"{base}/openai/deployments/{quote(deployment, safe='')}/chat/completions"
            f"?api-version={quote(version, safe='')}")


def _filtered_categories(error: dict[str, Any]) -> list[str]:
    inner = error.get("innererror")
    result = inner.get("content_filter_result") if isinstance(inner, dict) else None
    if not isinstance(result, dict):
        return []
    return sorted(name for name, verdict in result.items() if isinstance(verdict, dict) and verdict.get("filtered"))


def map_azure_error(provider: str, status: int, raw: bytes, headers: Mapping[str, str],
                    secret: str | None) -> GatewayError:
    """`upstream.ErrorMapper` for Azure: content-filter 400s get their own clear error, the
    rest goes to the shared table. Never includes the key."""
    if status == 400:
        try:
            parsed = _any_decoder.decode(raw)
        except msgspec.DecodeError:
            parsed = None
        error = parsed.get("error") if isinstance(parsed, dict) else None
        inner = error.get("innererror") if isinstance(error, dict) else None
        if isinstance(error, dict) and (
            error.get("code") == "content_filter"
            or (isinstance(inner, dict) and inner.get("code") == "ResponsibleAIPolicyViolation")
        ):
            categories = _filtered_categories(error)
            which = f" ({', '.join(categories)})" if categories else ""
            return InvalidRequest(
                f"Provider '{provider}' blocked the request with its content filter{which}: "
                f"{provider_message(raw, secret)}",
                code="content_filter",
            )
    return map_upstream_error(provider, status, raw, headers, secret)


class AzureOpenAIProvider(OpenAIProvider):
    """`ChatProvider` for Azure OpenAI deployments (dated API) and the v1 API."""

    def __init__(self) -> None:
        super().__init__("openai")
        self._map_error = map_azure_error
        # Azure's deployment URLs have no sibling /responses endpoint: always translate.
        self.native_apis = frozenset()

    def _request(self, call: UpstreamCall) -> tuple[str, dict[str, str]]:
        headers = {"Content-Type": "application/json", **call.extra_headers}
        if call.api_key:
            if call.provider.options.get("auth") == "bearer":
                headers["Authorization"] = f"Bearer {call.api_key.reveal()}"
            else:
                headers["api-key"] = call.api_key.reveal()
        return azure_chat_url(call), headers
