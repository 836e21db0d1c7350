"""Admin inputs: the capped string types, the `Command` base (unknown fields refused, a `check`
for rules msgspec constraints cannot state), and parsing JSON into a checked command with 400s
that name the offending field.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

import msgspec

from schemas.entities import ProviderKind
from schemas.errors import InvalidRequest
from schemas.http import validate

T = TypeVar("T")

# Caps on every admin string: an entity travels in KV values, events and Postgres rows, and a
# worker keeps all of them in memory, so no field may be unbounded.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ModelRef = Annotated[str, msgspec.Meta(min_length=3, max_length=321)]  # Ident "/" ModelId
BaseUrl = Annotated[str, msgspec.Meta(max_length=2048)]
ApiKey = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
OptionValue = Annotated[str, msgspec.Meta(max_length=1024)]
Options = Annotated[dict[Ident, OptionValue], msgspec.Meta(max_length=32)]
# A glob (fnmatch) over `provider/model`, a provider name or an endpoint path; lists are capped
# because a worker matches them on every request.
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=321)]
Globs = Annotated[tuple[Glob, ...], msgspec.Meta(max_length=64)]
ProviderKinds = Annotated[tuple[ProviderKind, ...], msgspec.Meta(max_length=32)]
Timestamp = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MAX_KEY_TTL_S = 10 * 366 * 86400
KeyTtl = Annotated[int, msgspec.Meta(ge=1, le=MAX_KEY_TTL_S)]

# C0 and C1 control characters, DEL included. A NUL cannot be stored by Postgres (the request
# was a 500), and CR/LF in a provider key made every call to that provider fail as a bad header.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


class Command(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An admin input. `check` states the rules msgspec constraints cannot (raises InvalidRequest
    naming the field); `parse_command` runs it after decoding."""

    def check(self) -> None:
        return None


def parse_timestamp_ms(text: str, param: str) -> int:
    """ISO-8601 with a UTC offset ("2030-01-01T00:00:00Z") -> epoch ms; 400 naming `param`."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"'{param}' must be an ISO-8601 timestamp such as '2030-01-01T00:00:00Z'.",
                             param=param, code="invalid_timestamp") from None
    if when.tzinfo is None:
        raise InvalidRequest(f"'{param}' must carry a UTC offset ('Z' or '+02:00'); a local time is ambiguous.",
                             param=param, code="invalid_timestamp")
    return int(when.timestamp() * 1000)


def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a decoded command, with the dotted path of the field holding it."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield path, k
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from _strings(getattr(value, name), f"{path}.{name}" if path else name)


def check_command(cmd: msgspec.Struct) -> None:
    """Rules msgspec constraints cannot state; raises InvalidRequest (400) naming the field.

    No control character in any string (names, ids, URLs, options, keys, list items), then the
    command's own `check` (a provider key is printable ASCII, a provider name is not one of the
    data plane's own path segments, amounts are decimal strings, timezones exist, ...).
    """
    for path, text in _strings(cmd, ""):
        if CONTROL_CHARS.search(text):
            raise InvalidRequest(f"'{path}' must not contain control characters (NUL, CR, LF, tab, ...).",
                                 param=path, code="invalid_characters")
    if isinstance(cmd, Command):
        cmd.check()


def parse_command(raw: Any, schema: type[T]) -> T:
    """Decoded JSON -> a checked command Struct, or a 400 naming the offending field."""
    cmd = validate(raw, schema)
    assert isinstance(cmd, msgspec.Struct)
    check_command(cmd)
    return cmd


def given_fields(patch: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH body set (null included), as JSON values."""
    return {name: msgspec.to_builtins(getattr(patch, name)) for name in patch.__struct_fields__
            if getattr(patch, name) is not msgspec.UNSET}


def now_ms() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


