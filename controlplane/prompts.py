"""Admin commands of prompt templates (see commands.py for how a command is committed).

A template is versioned by name within its workspace: `POST /admin/v1/prompts` creates version 1
of a new name and version n+1 of an existing one (each version is its own entity, never changed
afterwards; a version number is never reused, even after a delete). Two concurrent creates of one
name are serialised by a transaction-level advisory lock, so they get consecutive versions.
Placeholders are checked at create time (400 `malformed_placeholder` naming the message); the
rendering rules are in `schemas.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import psycopg

from controlplane.commands import CommitHook, ConfigCommands, Write, public_view
from controlplane.inputs import Command, Ident, ModelRef
from controlplane.references import references
from schemas.entities import PromptMessage, PromptParams, PromptTemplate
from schemas.errors import NotFound
from schemas.ids import new_id
from schemas.prompts import placeholders

Content = Annotated[str, msgspec.Meta(max_length=200_000)]
Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
StopWord = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class MessageIn(Command):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content


class ParamsIn(Command):
    """Default sampling parameters; a request's own values win."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Unit | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=10**7)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    stop: Annotated[tuple[StopWord, ...], msgspec.Meta(max_length=4)] | None = None


class CreatePrompt(Command):
    """A new version of the template `name`: `messages` (chat messages whose contents may hold
    `{{variable}}` placeholders), an optional default `model` (`provider/model` or an alias) and
    `params`."""

    workspace_id: Ident
    name: Ident
    messages: Annotated[tuple[MessageIn, ...], msgspec.Meta(min_length=1, max_length=100)]
    model: ModelRef | None = None
    params: ParamsIn = msgspec.field(default_factory=ParamsIn)

    def check(self) -> None:
        for i, msg in enumerate(self.messages):
            placeholders(msg.content, f"messages[{i}].content")


async def create_prompt(cc: ConfigCommands, cmd: CreatePrompt, on_commit: CommitHook | None = None) -> dict[str, Any]:
    """Version n+1 of `cmd.name` (1 for a new name). 201 body: the template with `id`, `version`,
    `revision`."""
    async def plan(conn: psycopg.AsyncConnection[Any]) -> tuple[Sequence[Write], dict[str, Any]]:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                           (f"prompt/{cmd.workspace_id}/{cmd.name}",))
        cur = await conn.execute("SELECT coalesce(max((body->>'version')::int), 0) FROM config_entity "
                                 "WHERE kind = 'prompt' AND workspace_id = %s AND body->>'name' = %s",
                                 (cmd.workspace_id, cmd.name))
        row = await cur.fetchone()
        version = (row[0] if row else 0) + 1
        template = PromptTemplate(
            id=new_id("prompt"), workspace_id=cmd.workspace_id, name=cmd.name, version=version,
            messages=tuple(PromptMessage(role=m.role, content=m.content) for m in cmd.messages), model=cmd.model,
            params=msgspec.convert(msgspec.to_builtins(cmd.params), PromptParams))
        return [Write(template, "created", references(template), create_only=True)], public_view(template)
    return await cc.commit(plan, on_commit)


async def prompt_versions(cc: ConfigCommands, name: str, workspace_id: str | None) -> list[dict[str, Any]]:
    """Every live version of `name` (in `workspace_id`, or in any workspace), oldest first; 404
    `prompt_not_found` when there is none."""
    found = [p for p in await cc.list("prompt", workspace_id) if p["name"] == name]
    if not found:
        raise NotFound(f"No prompt template named '{name}'" + (f" in workspace '{workspace_id}'."
                                                                if workspace_id else "."),
                       code="prompt_not_found")
    return sorted(found, key=lambda p: (p["workspace_id"], p["version"]))
