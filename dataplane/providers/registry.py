"""Provider registry: provider `type` -> adapter. A new provider is one module plus one line here."""

from __future__ import annotations

from dataplane.providers import openai_compat
from dataplane.providers.anthropic import AnthropicProvider
from dataplane.providers.azure import AzureOpenAIProvider
from dataplane.providers.base import ChatProvider
from dataplane.providers.bedrock import BedrockProvider
from dataplane.providers.gemini import GeminiProvider
from dataplane.providers.mock import MockProvider
from dataplane.providers.ollama import OllamaProvider
from dataplane.providers.openai import OpenAIProvider
from schemas.errors import NotFound

ADAPTERS: dict[str, ChatProvider] = {
    "mock": MockProvider(),
    "openai": OpenAIProvider(),
    "azure": AzureOpenAIProvider(),
    "anthropic": AnthropicProvider(),
    "bedrock": BedrockProvider(),
    "gemini": GeminiProvider(),
    "ollama": OllamaProvider(),
    # The OpenAI-compatible family: one OpenAI adapter per type, each with its quirks profile.
    **{kind: OpenAIProvider(kind) for kind in openai_compat.PROFILES},
}


def adapter_for(provider_type: str) -> ChatProvider:
    adapter = ADAPTERS.get(provider_type)
    if adapter is None:
        raise NotFound(f"Provider type '{provider_type}' is not supported by this gateway version.",
                       code="provider_not_found")
    return adapter
