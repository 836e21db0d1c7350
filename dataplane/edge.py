"""Pure checks on what a client sends, applied before any of it can reach an event.

Every client string the gateway records (model, agent context ids, properties) passes
`check_text`: a length cap and printable text only. `str.isprintable` is the whole character
rule because it refuses, in one C call, exactly what would poison the books downstream: NUL
(Postgres `text` refuses it), other control characters (CR/LF would split headers and logs),
and lone surrogates (the form invalid UTF-8 takes in headers decoded with `surrogateescape`; the
event encoder cannot encode them). A violation raises `InvalidValue` (400 `invalid_value`, `param`
= the field or header name), which the lifecycle never turns into an event: the value itself is
what could not be stored. Messages never echo the offending value.

JSON nesting is capped where bodies are decoded (`schemas.http.check_json_depth`).

No IO, no clock, no globals beyond compiled constants.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas.errors import InvalidValue

MAX_MODEL_LEN = 256  # characters; real model ids are well under 100, aliases are admin-chosen names
MAX_PROPERTY_NAME_LEN = 64  # the part after `Alephant-Property-`
MAX_PROPERTY_VALUE_BYTES = 1024  # UTF-8 bytes of one property value
MAX_PROPERTIES = 32  # per request

PROPERTY_PREFIX = "alephant-property-"



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
