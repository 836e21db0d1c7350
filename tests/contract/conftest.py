"""The contract suite's stack: one tool-aware fake per provider type, registered as `f-<type>`
providers in the demo workspace of the session's gateway, and a virtual key to call them with.

Tests drive the gateway with the official SDKs (async clients) and raw aiohttp, and check what
the fakes received. Fakes are shared by the session: a test that counts upstream attempts
measures `len(fake.requests)` before and after its own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio

from tests.conftest import Gateway
from tests.contract.fakes import (
    ANSWERS,
    ContractAnthropic,
    ContractAzure,
    ContractBedrock,
    ContractGemini,
    ContractOllama,
    ContractOpenAI,
)

# Every provider type the suite covers, with the upstream model it calls and whether the
# gateway can price that model (bundled genai-prices catalog; Ollama has none).
KINDS = ("openai", "azure", "groq", "anthropic", "gemini", "bedrock", "ollama")
MODELS = {
    "openai": "gpt-4o-mini",
    "azure": "gpt-4o-mini",
    "groq": "llama-3.1-8b-instant",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.5-flash",
    "bedrock": "amazon.nova-micro-v1:0",
    "ollama": "llama3.2",
}
PRICED = {kind: kind != "ollama" for kind in KINDS}
CATALOG_ID = {"openai": "openai", "azure": "azure", "groq": "groq", "anthropic": "anthropic", "gemini": "google",
              "bedrock": "aws"}
TIMEOUT_S = 20.0


@dataclass
class Upstream:
    kind: str
    fake: Any
    api_key: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"f-{self.kind}"

    @property
    def model(self) -> str:
        return MODELS[self.kind]

    @property
    def ref(self) -> str:
        """The model as clients name it: `f-<kind>/<model>`."""
        return f"{self.name}/{self.model}"

    @property
    def text(self) -> str:
        """What the fake answers when no tool is involved."""
        return ANSWERS[self.kind]

    def seen(self) -> int:
        return len(self.fake.requests)


@dataclass
class Contract:
    gateway: Gateway
    key: str
    upstreams: dict[str, Upstream]

    @property
    def origin(self) -> str:
        return self.gateway.stack.origin

    def __getitem__(self, kind: str) -> Upstream:
        return self.upstreams[kind]

    def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("api_key", self.key)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", TIMEOUT_S)
        return openai.AsyncOpenAI(base_url=self.gateway.base_url, **kwargs)

    def anthropic(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        kwargs.setdefault("api_key", self.key)
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", TIMEOUT_S)
        return anthropic.AsyncAnthropic(base_url=self.origin, **kwargs)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(autouse=True)
def _no_leftover_failures(contract: Contract) -> Iterator[None]:
    """A test that fails before consuming the failures it queued must not fail the next ones."""
    yield
    for up in contract.upstreams.values():
        up.fake._failures.clear()


@contextlib.contextmanager
def gemini_requires_signatures(up: Upstream) -> Iterator[None]:
    """While active, the Gemini fake refuses a replayed function call whose thought signature it
    did not issue (as Gemini 3 does). A no-op for other providers."""
    if up.kind != "gemini":
        yield
        return
    up.fake.require_thought_signatures = True
    try:
        yield
    finally:
        up.fake.require_thought_signatures = False


async def _wait_for_providers(gw: Gateway, key: str, names: list[str]) -> None:
    """Until the data plane's snapshot has every provider: count_tokens resolves the model (404
    before) and, except for Anthropic, answers without calling upstream."""
    pending = set(names)
    deadline = asyncio.get_running_loop().time() + 20
    async with aiohttp.ClientSession() as http:
        while pending:
            for name in sorted(pending):
                async with http.post(f"{gw.stack.origin}/v1/messages/count_tokens",
                                     json={"model": f"{name}/{MODELS[name[2:]]}",
                                           "messages": [{"role": "user", "content": "ping"}]},
                                     headers={"Authorization": f"Bearer {key}"}) as resp:
                    if resp.status == 200:
                        pending.discard(name)
            if pending:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"providers never reached the data plane: {sorted(pending)}")
                await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="session")
async def contract(gateway: Gateway) -> AsyncIterator[Contract]:
    async with contextlib.AsyncExitStack() as stack:
        bedrock_key = "bedrock-api-key-contract-5555"
        fakes: dict[str, tuple[Any, str, dict[str, str]]] = {
            "openai": (ContractOpenAI(), "sk-openai-contract-1111", {}),
            "azure": (ContractAzure(), "azure-contract-key-2222", {}),
            "groq": (ContractOpenAI(), "gsk-contract-3333", {}),
            "anthropic": (ContractAnthropic(), "sk-ant-contract-4444", {}),
            "gemini": (ContractGemini(), "AIza-contract-6666", {}),
            "bedrock": (ContractBedrock(bearer_token=bedrock_key), bedrock_key,
                        {"auth": "bearer", "region": "us-east-1"}),
            "ollama": (ContractOllama(), "ollama-contract-7777", {}),
        }
        upstreams: dict[str, Upstream] = {}
        for kind, (fake, api_key, options) in fakes.items():
            await stack.enter_async_context(fake)
            upstreams[kind] = Upstream(kind, fake, api_key, options)
        for up in upstreams.values():
            await asyncio.to_thread(gateway.admin.call, "POST", "/admin/v1/providers", {
                "workspace_id": "demo", "name": up.name, "type": up.kind, "base_url": up.fake.base_url,
                "api_key": up.api_key, "options": up.options})
        created = await asyncio.to_thread(gateway.create_key, name="sdk-contract")
        await _wait_for_providers(gateway, created["key"], [up.name for up in upstreams.values()])
        yield Contract(gateway=gateway, key=created["key"], upstreams=upstreams)
