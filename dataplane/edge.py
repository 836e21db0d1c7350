"""Pure checks on what a client sends, applied before any of it can reach an event.

Every client string the gateway records (model, agent context ids, properties) passes
`check_text`: a length cap and printable text only. `str.isprintable` is the whole character
rule because it refuses, in one C call, exactly what would poison the books downstream: NUL
(Postgres `text` refuses it), other control characters (CR/LF would split headers and logs),
and lone surrogates (the form invalid UTF-8 takes in headers decoded with `surrogateescape`; the
event encoder cannot encode them). A violation raises `InvalidValue` (400 `invalid_value`, `param`
= the field or header name), which the lifecycle never turns into an event: the value itself is
what could not be stored. Messages never echo the offending value.

JSON nesting is capped at `MAX_JSON_DEPTH` before a decoded body is processed further: the
translators, the validator and the upstream encoders all recurse, and a body a few hundred
levels deep would otherwise end in `RecursionError` somewhere past the point of a clean 400.

No IO, no clock, no globals beyond compiled constants.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterable
from typing import Any

from schemas.errors import InvalidRequest, InvalidValue

MAX_MODEL_LEN = 256  # characters; real model ids are well under 100, aliases are admin-chosen names
MAX_PROPERTY_NAME_LEN = 64  # the part after `Alephant-Property-`
MAX_PROPERTY_VALUE_BYTES = 1024  # UTF-8 bytes of one property value
MAX_PROPERTIES = 32  # per request
# Deeper than any real tool schema or message structure; far below Python's recursion limit, so
# every later recursive step (validation, translation, encoding upstream) has room to spare.
MAX_JSON_DEPTH = 128

PROPERTY_PREFIX = "alephant-property-"

_CONTAINERS = frozenset((list, dict))  # what msgspec decodes JSON arrays and objects to


def check_text(value: str, param: str, max_len: int) -> str:
    """`value` unchanged when it is at most `max_len` characters of printable text (see the
    module docstring); else InvalidValue naming `param`. The length is checked first, so a huge
    value costs one `len`."""
    if len(value) > max_len:
        raise InvalidValue(f"'{param}' is longer than the {max_len}-character limit.", param=param)
    if not value.isprintable():
        raise InvalidValue(f"'{param}' must be printable UTF-8 text, without NUL or control characters.",
                           param=param)
    return value


def check_model(model: str) -> str:
    """The client's `model` (a `provider/model_id` or an alias), or InvalidValue(param="model")."""
    return check_text(model, "model", MAX_MODEL_LEN)


def check_properties(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`(name, value)` for every `Alephant-Property-<name>` header, name as sent. At most
    `MAX_PROPERTIES`, each name 1..`MAX_PROPERTY_NAME_LEN` characters and each value at most
    `MAX_PROPERTY_VALUE_BYTES` UTF-8 bytes of printable text; else InvalidValue naming the header
    (or `Alephant-Property-*` for the count)."""
    props: list[tuple[str, str]] = []
    for name_as_sent, value in headers:
        if not name_as_sent.lower().startswith(PROPERTY_PREFIX):
            continue
        header = str(name_as_sent)  # aiohttp's names are `istr`, which the error and event encoders refuse
        if len(props) == MAX_PROPERTIES:
            raise InvalidValue(f"At most {MAX_PROPERTIES} Alephant-Property-* headers are allowed.",
                               param="Alephant-Property-*")
        name = header[len(PROPERTY_PREFIX):]
        if not name:
            raise InvalidValue("Alephant-Property-* headers need a name after the prefix.", param=header)
        check_text(name, header, MAX_PROPERTY_NAME_LEN)
        check_text(value, header, MAX_PROPERTY_VALUE_BYTES)
        # Printable, hence free of surrogates, hence encodable.
        if len(value.encode()) > MAX_PROPERTY_VALUE_BYTES:
            raise InvalidValue(f"'{header}' is longer than the {MAX_PROPERTY_VALUE_BYTES}-byte limit.",
                               param=header)
        props.append((name, value))
    return tuple(props)


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether decoded JSON `value` nests arrays/objects more than `limit` deep. Breadth-first,
    one level at a time: `gc.get_referents` lists a level's items (dict values, list elements)
    and the container filter runs in C, so the cost is a few tens of ns per value, with no
    recursion and no per-value Python code."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        items = gc.get_referents(*level)
        level = list(itertools.compress(items, map(_CONTAINERS.__contains__, map(type, items))))
    return False


def check_json_depth(body: bytes, value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """InvalidRequest (code `json_too_deep`) when `value`, decoded from `body`, nests deeper than
    `limit`. A body with at most `limit` opening brackets in all (nearly every request) cannot,
    and costs two `bytes.count` calls; others are walked (`json_depth_exceeds`)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    if json_depth_exceeds(value, limit):
        raise too_deep(limit)


def too_deep(limit: int = MAX_JSON_DEPTH) -> InvalidRequest:
    return InvalidRequest(f"The JSON body is nested deeper than the {limit}-level limit.", code="json_too_deep")
