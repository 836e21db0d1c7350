"""Admin commands of log destinations (see commands.py for how a command is validated and committed),
and the delivery state the admin API shows beside them.

A log destination (`schemas.entities.LogDestination`) receives the event stream, filtered by
workspace and event type, through the projector's delivery task (`events.delivery`): a `webhook`
(one signed HTTPS POST per event), an `otlp` collector (OTLP/HTTP JSON logs) or an `s3` prefix
(newline-delimited JSON objects). The `secret` is stored only Fernet-encrypted (like provider
keys); answers show `has_secret`, never the secret or its ciphertext. A PATCH without `secret`
keeps the stored one; `"secret": null` removes it.

Every refusal is a 400 whose `param` names the field, and nothing is written:

* `kind` not one of webhook, otlp, s3 (`invalid_kind`);
* a webhook or otlp `url` that is not an http(s) URL, or reaches an internal address (the provider
  base URL's SSRF rules, `ssrf.py`: `base_url_not_allowed`, `base_url_unresolvable`,
  `invalid_base_url`), or is plain http to a host not on the SSRF allow list (`insecure_url`:
  events leave the gateway, so https, except to the local stack's own hosts);
* an s3 `url` that is not `s3://bucket/prefix` with a valid bucket name (`invalid_s3_url`);
* an `event_types` entry that is not an event type of the stream (`unknown_event_type`, param
  `event_types[i]`);
* a `secret` that is not printable ASCII (`invalid_secret`), or for s3 not
  `access_key_id:secret_access_key` (`invalid_secret`; the message never quotes it);
* a `workspace_id` that is not an id (`invalid_workspace_id`), or not a live workspace (404
  `workspace_not_found`, references.py). Empty or omitted: every workspace (operator level).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Collection
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import msgspec
from psycopg_pool import AsyncConnectionPool

from controlplane.commands import ConfigCommands, KindSpec, Prior, _builtins
from controlplane.inputs import PRINTABLE_ASCII, ApiKey, BaseUrl, Command, now_ms
from controlplane.paid_admin import check_http_url, check_url_resolving
from schemas.entities import LOG_DESTINATION_TYPES, LogDestination, LogDestinationType
from schemas.errors import InvalidRequest
from schemas.ids import new_id
from schemas.log_delivery import EVENT_TYPES, parse_s3_url
from schemas.ssrf import AddressPolicy, address_problem, parse_host_address, url_host

_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_EVENT_TYPES = 64

KindText = Annotated[str, msgspec.Meta(max_length=32)]
WorkspaceText = Annotated[str, msgspec.Meta(max_length=64)]
EventType = Annotated[str, msgspec.Meta(max_length=64)]
EventTypes = Annotated[tuple[EventType, ...], msgspec.Meta(max_length=MAX_EVENT_TYPES)]
DestName = Annotated[str, msgspec.Meta(max_length=120)]


class CreateLogDestination(Command):
    """Deliver events to `url`: `kind` webhook (an https URL; each event POSTed as JSON, signed
    with `secret` in `Alephant-Signature`), otlp (an https OTLP/HTTP collector base URL; logs go
    to `{url}/v1/logs`, `secret` sent as a bearer token) or s3 (`s3://bucket/prefix`; NDJSON
    objects; `secret` optional, `access_key_id:secret_access_key`). `workspace_id` omitted or
    empty: every workspace's events (operator level). `event_types` (e.g. ["llm.call"]) empty:
    every type. `enabled` false pauses delivery (events wait in the stream)."""

    kind: KindText
    url: BaseUrl
    workspace_id: WorkspaceText | None = None
    secret: ApiKey | None = None
    event_types: EventTypes = ()
    name: DestName = ""
    enabled: bool = True

    def check(self) -> None:
        check_kind(self.kind)
        if self.workspace_id and not _IDENT_RE.match(self.workspace_id):
            raise InvalidRequest("'workspace_id' must be a workspace id (letters, digits, '-' or '_'), or empty for "
                                 "every workspace.", param="workspace_id", code="invalid_workspace_id")
        if self.kind == "s3":
            check_s3_url(self.url)
        else:
            check_http_url(self.url, "url")
        check_event_types(self.event_types)
        if self.secret is not None:
            check_secret(self.secret, self.kind)


class PatchLogDestination(Command):
    """Any field but `workspace_id`; `event_types` replaces the whole list; `secret: null`
    removes the secret, an omitted one keeps it."""

    kind: KindText | msgspec.UnsetType = msgspec.UNSET
    url: BaseUrl | msgspec.UnsetType = msgspec.UNSET
    secret: ApiKey | msgspec.UnsetType | None = msgspec.UNSET
    event_types: EventTypes | msgspec.UnsetType = msgspec.UNSET
    name: DestName | msgspec.UnsetType = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


# ---- pure checks (each raises InvalidRequest naming the field) ------------------------------------

def check_kind(kind: str) -> None:
    if kind not in LOG_DESTINATION_TYPES:
        raise InvalidRequest(f"'kind' must be one of {', '.join(LOG_DESTINATION_TYPES)}; got {kind[:32]!r}.",
                             param="kind", code="invalid_kind")




def check_s3_url(url: str) -> None:
    if parse_s3_url(url) is None:
        raise InvalidRequest(f"An s3 destination's 'url' must be s3://bucket/prefix (a valid bucket name: 3-63 "
                             f"lower-case letters, digits, '.' or '-'); got {url[:120]!r}.", param="url",
                             code="invalid_s3_url")


def check_event_types(event_types: tuple[str, ...]) -> None:
    for i, event_type in enumerate(event_types):
        if event_type not in EVENT_TYPES:
            raise InvalidRequest(f"'event_types[{i}]' is not an event type: {event_type[:64]!r}. Types: "
                                 + ", ".join(sorted(EVENT_TYPES)) + ".", param=f"event_types[{i}]",
                                 code="unknown_event_type")


def check_secret(secret: str, kind: str) -> None:
    # Never echo the secret, not even a prefix.
    if not PRINTABLE_ASCII.match(secret):
        raise InvalidRequest("'secret' must be printable ASCII.", param="secret", code="invalid_secret")
    if kind == "s3":
        key_id, colon, key = secret.partition(":")
        if not colon or not key_id or not key:
            raise InvalidRequest("An s3 destination's 'secret' is 'access_key_id:secret_access_key' (omit it to use "
                                 "the gateway's own AWS credentials).", param="secret", code="invalid_secret")


def http_allowed(url: str, allow: Collection[str]) -> bool:
    """Plain http is allowed only to a host the SSRF allow list names (a host name on it, or an
    internal address inside one of its networks): the local stack's own receivers."""
    host = url_host(url)
    policy = AddressPolicy(allow)
    if policy.host_allowed(host):
        return True
    addr = parse_host_address(host.partition("%")[0])
    return addr is not None and address_problem(addr) is not None and policy.refusal(addr) is None


# ---- IO checks and the kind ---------------------------------------------------------------------

async def _build(cc: ConfigCommands, cmd: CreateLogDestination, ent_id: str,
                 prior: Prior | None) -> LogDestination:
    if cmd.kind != "s3":
        await check_url_resolving(cc, cmd.url, "url")
        if urlsplit(cmd.url).scheme == "http" and not http_allowed(cmd.url, cc.ssrf_allow):
            raise InvalidRequest("'url' must be https: events leave the gateway (plain http only to hosts on the "
                                 "SSRF allow list, ALEPHANT_SSRF_ALLOW).", param="url", code="insecure_url")
    if prior is not None and "secret" not in prior.given:
        secret_enc = prior.entity.secret_enc
        if secret_enc is not None and cmd.kind == "s3" and prior.entity.type != "s3":
            raise InvalidRequest("Changing to an s3 destination needs its 'secret' anew ('access_key_id:"
                                 "secret_access_key', or null for the gateway's own credentials).", param="secret",
                                 code="invalid_secret")
    else:
        secret_enc = None if cmd.secret is None else cc.keyring.encrypt(cmd.secret)
    return LogDestination(
        id=ent_id, type=cast(LogDestinationType, cmd.kind), url=cmd.url, workspace_id=cmd.workspace_id or None,
        secret_enc=secret_enc, event_types=tuple(dict.fromkeys(cmd.event_types)), name=cmd.name,
        enabled=cmd.enabled, created_at_ms=prior.entity.created_at_ms if prior is not None else now_ms())


def _fields(dest: LogDestination) -> dict[str, Any]:
    # What a PATCH merges over: no `secret` (only its ciphertext is stored), so `_build` keeps it
    # unless the PATCH gives one.
    return {"kind": dest.type} | _builtins(dest, "url", "workspace_id", "event_types", "name", "enabled")


LOG_DESTINATION = KindSpec("logdest", "Log destination", CreateLogDestination, PatchLogDestination,
                           lambda c: new_id("logdest"), _fields, _build)


# ---- delivery state (written by events.delivery) -------------------------------------------------

_NO_STATE: dict[str, Any] = {"delivered": 0, "failed": 0, "dead_lettered": 0, "last_error": None,
                             "last_error_at": None, "last_delivered_at": None}


async def delivery_state(pool: AsyncConnectionPool[Any], dest_id: str) -> dict[str, Any]:
    """`delivered` (events), `failed` (failed attempts, retried or not), `dead_lettered` (events
    given up on), `last_error` (a reason, never a secret) and when, `last_delivered_at`."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT delivered, failed, dead_lettered, last_error, last_error_at, "
                                 "last_delivered_at FROM log_delivery_state WHERE destination_id = %s", (dest_id,))
        row = await cur.fetchone()
    if row is None:
        return dict(_NO_STATE)
    return {"delivered": row[0], "failed": row[1], "dead_lettered": row[2], "last_error": row[3],
            "last_error_at": _iso(row[4]), "last_delivered_at": _iso(row[5])}


async def dead_letters(pool: AsyncConnectionPool[Any], dest_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The destination's dead-lettered events, newest first: the event as stored (as JSON when it
    is JSON, else `event_b64`), its type and id, the attempts made and the reason."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT event_id, stream_seq, event_type, attempts, reason, event, dead_at "
                                 "FROM log_dead_letter WHERE destination_id = %s ORDER BY dead_at DESC, stream_seq "
                                 "DESC LIMIT %s", (dest_id, limit))
        rows = await cur.fetchall()
    out = []
    for event_id, seq, event_type, attempts, reason, body, dead_at in rows:
        item: dict[str, Any] = {"event_id": event_id, "stream_seq": seq, "type": event_type, "attempts": attempts,
                                "reason": reason, "dead_lettered_at": _iso(dead_at)}
        try:
            item["event"] = msgspec.json.decode(bytes(body))
        except msgspec.DecodeError:
            item["event_b64"] = base64.b64encode(bytes(body)).decode()
        out.append(item)
    return out


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")
