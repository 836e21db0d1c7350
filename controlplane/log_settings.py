"""Admin commands of log settings (see commands.py for how a command is validated and committed).

A `LogSettings` (`schemas.entities.LogSettings`) says what is kept of a workspace's or one virtual
key's requests beyond the event's metadata: `bodies` none | request | both, archived to S3 by the
data plane (`dataplane.bodies`) after redaction (`redact_paths`, `redact_patterns`), and deleted
after `retention_days` by the control plane's sweeper (`controlplane.bodies_retention`; it applies
the workspace-scoped setting's retention to every object of the workspace).

There is one per (workspace, scope, scope id): its id is derived from that triple, so creating a
second one is a 409 `already_exists` (change the existing one with PATCH); the scope is fixed once
set.

Every refusal is a 400 whose `param` is the field, and nothing is written: an unknown `scope`
(`invalid_scope`) or `bodies` (`invalid_bodies`); a workspace-scoped setting whose `scope_id` is
not its workspace (`scope_mismatch`); more than 32 `redact_paths`, or one that is not dot-separated
segments of letters, digits, `_` and `-` (or a lone `*`: any key or list item), 1..200 characters
(`invalid_redact_path`); more than 16 `redact_patterns`, or one that is empty, longer than 200
characters, not a Python regular expression, or matching the empty string (`invalid_redact_pattern`);
`retention_days` outside 1..3650 (`invalid_retention`). A key-scoped setting's `scope_id` must be a
live virtual key of the workspace (404 `virtual_key_not_found`, 400
`virtual_key_workspace_mismatch`; references.py), and the workspace must exist (404
`workspace_not_found`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, cast, get_args

import msgspec

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins, _stable_id
from controlplane.inputs import Command, Ident
from schemas.entities import LogBodies, LogSettings
from schemas.errors import Conflict, InvalidRequest

LOG_SCOPES: tuple[str, ...] = ("workspace", "key")
LOG_BODIES: tuple[str, ...] = get_args(LogBodies)
MAX_REDACT_PATHS = 32
MAX_REDACT_PATTERNS = 16
MAX_REDACT_TEXT = 200
MAX_RETENTION_DAYS = 3650
# A path segment is a JSON key or list index, or `*` alone: `schemas.redaction` compares whole
# segments, so a partial wildcard such as `mess*` would silently match nothing.
_SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9_-]+|\*)$")

Word = Annotated[str, msgspec.Meta(max_length=32)]
# The caps are checked in `check` (each refusal has its own code); the body limit bounds them first.
Texts = tuple[str, ...]


class SetLogSettings(Command):
    """What is kept of the requests of `workspace_id` at `scope` (workspace | key) `scope_id` (the
    workspace itself, or a virtual key id of that workspace; a key's setting wins over its
    workspace's). `bodies`: none (metadata only, the default) | request | both (request and
    response), archived to S3 redacted. `redact_paths` (at most 32): JSON paths masked whole,
    dot-separated, `*` for any key or list item, e.g. `messages.*.content`. `redact_patterns` (at
    most 16): Python regular expressions masked wherever they match, e.g. `SSN-\\d+`. Provider and
    virtual keys, `Authorization` values and secret-named fields are always masked.
    `retention_days`: 1..3650 (default 30); the workspace-scoped setting's applies to every body
    of the workspace. One per (workspace, scope, scope_id): a second is 409 `already_exists`."""

    workspace_id: Ident
    scope: Word
    scope_id: Ident
    bodies: Word = "none"
    redact_paths: Texts = ()
    redact_patterns: Texts = ()
    retention_days: int = 30

    def check(self) -> None:
        check_log_settings(self)


class PatchLogSettings(Command):
    """Any field but `workspace_id`, `scope` and `scope_id` (they name the setting); a list given
    replaces the stored one. The result is validated as a create."""

    bodies: Word | msgspec.UnsetType = msgspec.UNSET
    redact_paths: Texts | msgspec.UnsetType = msgspec.UNSET
    redact_patterns: Texts | msgspec.UnsetType = msgspec.UNSET
    retention_days: int | msgspec.UnsetType = msgspec.UNSET


def check_log_settings(cmd: SetLogSettings) -> None:
    """The rules that need no database; raises InvalidRequest naming the field."""
    if cmd.scope not in LOG_SCOPES:
        raise InvalidRequest(f"Unknown log settings scope {cmd.scope!r}: 'scope' must be one of "
                             f"{', '.join(LOG_SCOPES)}.", param="scope", code="invalid_scope")
    if cmd.scope == "workspace" and cmd.scope_id != cmd.workspace_id:
        raise InvalidRequest(f"A workspace-scoped log setting's 'scope_id' is its workspace ('{cmd.workspace_id}'); "
                             f"got '{cmd.scope_id}'.", param="scope_id", code="scope_mismatch")
    if cmd.bodies not in LOG_BODIES:
        raise InvalidRequest(f"Unknown 'bodies' {cmd.bodies!r}: it must be one of {', '.join(LOG_BODIES)} (none: "
                             "metadata only; request: the request body; both: request and response).",
                             param="bodies", code="invalid_bodies")
    check_redact_paths(cmd.redact_paths)
    check_redact_patterns(cmd.redact_patterns)
    if not 1 <= cmd.retention_days <= MAX_RETENTION_DAYS:
        # A JSON integer may have thousands of digits: not echoed whole.
        got = str(cmd.retention_days) if abs(cmd.retention_days) < 10**18 else "a number of more than 18 digits"
        raise InvalidRequest(f"'retention_days' must be between 1 and {MAX_RETENTION_DAYS} (10 years); got {got}.",
                             param="retention_days", code="invalid_retention")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def check_redact_paths(paths: Texts) -> None:
    if len(paths) > MAX_REDACT_PATHS:
        raise InvalidRequest(f"At most {MAX_REDACT_PATHS} 'redact_paths'; got {len(paths)}.", param="redact_paths",
                             code="invalid_redact_path")
    for i, path in enumerate(paths):
        param = f"redact_paths[{i}]"
        if not 1 <= len(path) <= MAX_REDACT_TEXT:
            raise InvalidRequest(f"'{param}' must be 1 to {MAX_REDACT_TEXT} characters; got {len(path)}.",
                                 param=param, code="invalid_redact_path")
        if not all(_SEGMENT_RE.match(segment) for segment in path.split(".")):
            raise InvalidRequest(f"'{param}' must be a JSON path: keys or list indexes (letters, digits, '_', '-') "
                                 "separated by dots, with '*' alone for any key or item, e.g. 'messages.*.content'; "
                                 f"got {_shown(path)}.", param=param, code="invalid_redact_path")


def check_redact_patterns(patterns: Texts) -> None:
    if len(patterns) > MAX_REDACT_PATTERNS:
        raise InvalidRequest(f"At most {MAX_REDACT_PATTERNS} 'redact_patterns'; got {len(patterns)}.",
                             param="redact_patterns", code="invalid_redact_pattern")
    for i, pattern in enumerate(patterns):
        param = f"redact_patterns[{i}]"
        if not 1 <= len(pattern) <= MAX_REDACT_TEXT:
            raise InvalidRequest(f"'{param}' must be 1 to {MAX_REDACT_TEXT} characters; got {len(pattern)}.",
                                 param=param, code="invalid_redact_pattern")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise InvalidRequest(f"'{param}' is not a valid regular expression ({exc}): {_shown(pattern)}.",
                                 param=param, code="invalid_redact_pattern") from None
        # One that matches nothing would put a mask between every two characters of every string.
        if compiled.fullmatch("") is not None:
            raise InvalidRequest(f"'{param}' matches the empty string, so it would mask between every character: "
                                 f"{_shown(pattern)}.", param=param, code="invalid_redact_pattern")


def log_settings_id(workspace_id: str, scope: str, scope_id: str) -> str:
    """The id of the one setting of (workspace, scope, scope id)."""
    return "logset_" + _stable_id("logsettings", workspace_id, scope, scope_id)


async def _build(cc: ConfigCommands, cmd: SetLogSettings, ent_id: str, prior: Prior | None) -> LogSettings:
    # The key and the workspace are checked in the write's transaction (`references`). A second
    # create of the same triple is refused there too (create-only insert, race-free); this check
    # first says which setting to change instead.
    if prior is None and await cc.load("logsettings", ent_id) is not None:
        target = "the workspace" if cmd.scope == "workspace" else f"virtual key '{cmd.scope_id}'"
        raise Conflict(f"Workspace '{cmd.workspace_id}' already has a log setting for {target} ('{ent_id}'); "
                       f"change it with PATCH /admin/v1/log-settings/{ent_id} (`alephant log-settings set` changes "
                       "an existing one).", code="already_exists")
    return LogSettings(id=ent_id, workspace_id=cmd.workspace_id, scope=cast(Any, cmd.scope), scope_id=cmd.scope_id,
                       bodies=cast(LogBodies, cmd.bodies), redact_paths=tuple(cmd.redact_paths),
                       redact_patterns=tuple(cmd.redact_patterns), retention_days=cmd.retention_days)


def _fields(s: LogSettings) -> dict[str, Any]:
    return _builtins(s, "workspace_id", "scope", "scope_id", "bodies", "redact_paths", "redact_patterns",
                     "retention_days")


LOG_SETTINGS = KindSpec("logsettings", "Log setting", SetLogSettings, PatchLogSettings,
                        lambda c: log_settings_id(c.workspace_id, c.scope, c.scope_id), _fields, _build)
