"""Log settings admin inputs (the checks that need no database): every refusal code names its
field, the edges that are accepted, one id per (workspace, scope, scope id), the key reference,
the CLI's bodies and the routes in the OpenAPI document."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from controlplane import commands as c
from controlplane.app import openapi_document
from controlplane.inputs import given_fields
from controlplane.log_settings import (
    LOG_SETTINGS,
    MAX_REDACT_PATHS,
    MAX_REDACT_PATTERNS,
    MAX_RETENTION_DAYS,
    PatchLogSettings,
    SetLogSettings,
    log_settings_id,
)
from controlplane.references import references
from deploy.admin_cli import add_admin_commands
from deploy.log_settings_cli import scope_of, settings_fields
from schemas.entities import LogSettings
from schemas.errors import InvalidRequest
from schemas.redaction import redact_json

BASE: dict[str, Any] = {"workspace_id": "demo", "scope": "workspace", "scope_id": "demo"}


def _refused(raw: dict[str, Any], schema: type[Any] = SetLogSettings) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        c.parse_command(raw, schema)
    assert info.value.status == 400
    return info.value


def test_a_minimal_body_takes_the_entity_defaults() -> None:
    cmd = c.parse_command(BASE, SetLogSettings)
    entity = LogSettings(id="x", workspace_id="demo", scope="workspace", scope_id="demo")
    assert (cmd.bodies, cmd.redact_paths, cmd.redact_patterns, cmd.retention_days) == (
        entity.bodies, entity.redact_paths, entity.redact_patterns, entity.retention_days)


@pytest.mark.parametrize("raw", [
    BASE | {"bodies": "none"}, BASE | {"bodies": "request"}, BASE | {"bodies": "both"},
    BASE | {"scope": "key", "scope_id": "vk_123"},
    BASE | {"retention_days": 1}, BASE | {"retention_days": MAX_RETENTION_DAYS},
    BASE | {"redact_paths": ["messages.*.content", "a", "*", "0.content", "x-y_z.*.B9"]},
    BASE | {"redact_paths": ["p" * 200], "redact_patterns": ["q" * 200]},
    BASE | {"redact_paths": [f"p{i}" for i in range(MAX_REDACT_PATHS)]},
    BASE | {"redact_patterns": [rf"SSN-\d+{i}" for i in range(MAX_REDACT_PATTERNS)]},
    BASE | {"redact_patterns": [r"SSN-\d+", r"(?i)acct[0-9]{6}", "a|b"]},
])
def test_edges_that_are_accepted(raw: dict[str, Any]) -> None:
    c.parse_command(raw, SetLogSettings)


@pytest.mark.parametrize(("patch", "param", "code", "words"), [
    ({"scope": "router"}, "scope", "invalid_scope", ("Unknown log settings scope 'router'", "workspace, key")),
    ({"scope": ""}, "scope", "invalid_scope", ("''",)),
    ({"scope_id": "other"}, "scope_id", "scope_mismatch", ("'demo'", "'other'")),
    ({"bodies": "all"}, "bodies", "invalid_bodies", ("'all'", "none, request, both")),
    ({"bodies": "None"}, "bodies", "invalid_bodies", ("'None'",)),
    ({"redact_paths": [f"p{i}" for i in range(MAX_REDACT_PATHS + 1)]}, "redact_paths", "invalid_redact_path",
     ("At most 32", "got 33")),
    ({"redact_paths": [""]}, "redact_paths[0]", "invalid_redact_path", ("1 to 200", "got 0")),
    ({"redact_paths": ["ok", "p" * 201]}, "redact_paths[1]", "invalid_redact_path", ("got 201",)),
    ({"redact_paths": ["messages..content"]}, "redact_paths[0]", "invalid_redact_path",
     ("messages.*.content", "'messages..content'")),
    ({"redact_paths": [".a"]}, "redact_paths[0]", "invalid_redact_path", ("JSON path",)),
    ({"redact_paths": ["a."]}, "redact_paths[0]", "invalid_redact_path", ("JSON path",)),
    ({"redact_paths": ["a b"]}, "redact_paths[0]", "invalid_redact_path", ("JSON path",)),
    ({"redact_paths": ["a/b"]}, "redact_paths[0]", "invalid_redact_path", ("JSON path",)),
    ({"redact_paths": ["mess*.content"]}, "redact_paths[0]", "invalid_redact_path", ("'*' alone",)),
    ({"redact_paths": ["a.**"]}, "redact_paths[0]", "invalid_redact_path", ("'*' alone",)),
    ({"redact_patterns": ["x"] * (MAX_REDACT_PATTERNS + 1)}, "redact_patterns", "invalid_redact_pattern",
     ("At most 16", "got 17")),
    ({"redact_patterns": [""]}, "redact_patterns[0]", "invalid_redact_pattern", ("1 to 200",)),
    ({"redact_patterns": ["x" * 201]}, "redact_patterns[0]", "invalid_redact_pattern", ("got 201",)),
    ({"redact_patterns": ["ok", "SSN-(\\d+"]}, "redact_patterns[1]", "invalid_redact_pattern",
     ("not a valid regular expression", "missing ), unterminated subpattern", "'SSN-(\\\\d+'")),
    ({"redact_patterns": ["[a-"]}, "redact_patterns[0]", "invalid_redact_pattern", ("unterminated character set",)),
    ({"redact_patterns": ["a*"]}, "redact_patterns[0]", "invalid_redact_pattern", ("matches the empty string",)),
    ({"redact_patterns": ["x|"]}, "redact_patterns[0]", "invalid_redact_pattern", ("matches the empty string",)),
    ({"retention_days": 0}, "retention_days", "invalid_retention", ("between 1 and 3650", "got 0")),
    ({"retention_days": -5}, "retention_days", "invalid_retention", ("got -5",)),
    ({"retention_days": MAX_RETENTION_DAYS + 1}, "retention_days", "invalid_retention", ("got 3651",)),
    ({"retention_days": 10**300}, "retention_days", "invalid_retention", ("more than 18 digits",)),
    # msgspec's own refusals: the type, unknown fields, ids, control characters.
    ({"retention_days": "14"}, "retention_days", None, ("int",)),
    ({"redact_paths": "a.b"}, "redact_paths", None, ("array",)),
    ({"redact_patterns": [1]}, "redact_patterns[0]", None, ("str",)),
    ({"scope_id": "has space"}, "scope_id", None, ("scope_id",)),
    ({"workspace_id": "x\ny"}, "workspace_id", None, ("workspace_id",)),
    ({"redact_patterns": ["a\nb"]}, "redact_patterns[0]", "invalid_characters", ("control characters",)),
    ({"ttl_s": 5}, None, None, ("ttl_s",)),
])
def test_bad_bodies_name_their_field(patch: dict[str, Any], param: str | None, code: str | None,
                                     words: tuple[str, ...]) -> None:
    error = _refused(BASE | patch)
    assert (error.param, error.code) == (param, code), error.message
    for word in words:
        assert word in error.message, (word, error.message)


def test_a_long_bad_value_is_not_echoed_whole() -> None:
    error = _refused(BASE | {"redact_paths": ["a b" * 60]})
    assert len(error.message) < 400 and "..." in error.message


def test_every_accepted_path_is_one_the_redaction_applies() -> None:
    record = {"messages": [{"role": "user", "content": "secret"}], "meta": {"x-y_z": "v"}}
    cmd = c.parse_command(BASE | {"redact_paths": ["messages.*.content", "meta.x-y_z"]}, SetLogSettings)
    assert redact_json(record, cmd.redact_paths) == {"messages": [{"role": "user", "content": "***"}],
                                                     "meta": {"x-y_z": "***"}}


def test_the_patch_cannot_move_a_setting() -> None:
    for field in ("workspace_id", "scope", "scope_id"):
        assert f"`{field}`" in _refused({field: "x"}, PatchLogSettings).message
    patch = c.parse_command({"retention_days": 7, "redact_paths": []}, PatchLogSettings)
    assert given_fields(patch) == {"retention_days": 7, "redact_paths": ()}


def test_one_id_per_workspace_scope_and_scope_id() -> None:
    one = log_settings_id("demo", "key", "vk_1")
    assert one == log_settings_id("demo", "key", "vk_1") and one.startswith("logset_") and len(one) <= 64
    assert len({one, log_settings_id("demo", "workspace", "vk_1"), log_settings_id("demo2", "key", "vk_1"),
                log_settings_id("demo", "key", "vk_2")}) == 4
    cmd = c.parse_command(BASE | {"scope": "key", "scope_id": "vk_1"}, SetLogSettings)
    # Not an upsert: a second create of the same triple is a 409 (create-only insert).
    assert LOG_SETTINGS.new_id(cmd) == one and not LOG_SETTINGS.upsert
    entity = LogSettings(id=one, workspace_id="demo", scope="key", scope_id="vk_1", bodies="both",
                         redact_paths=("a.*",), redact_patterns=(r"\d+",), retention_days=9)
    # What a PATCH is merged over parses back into the same setting.
    again = c.parse_command(LOG_SETTINGS.fields(entity), SetLogSettings)
    assert (again.bodies, again.redact_paths, again.redact_patterns, again.retention_days) == (
        "both", ("a.*",), (r"\d+",), 9)


def test_references_of_a_setting() -> None:
    def refs(**kw: Any) -> list[tuple[str, str, str]]:
        entity = LogSettings(id="x", workspace_id="demo", **kw)
        return [(r.kind, r.id, r.param) for r in references(entity)]

    assert refs(scope="workspace", scope_id="demo") == [("ws", "demo", "workspace_id")]
    assert refs(scope="key", scope_id="vk_1") == [("ws", "demo", "workspace_id"), ("vk", "vk_1", "scope_id")]


# ---- CLI and OpenAPI ------------------------------------------------------------------------------

def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="alephant")
    parser.add_argument("--state-dir", default=".alephant")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_cli_bodies() -> None:
    args = _cli("log-settings", "set", "-w", "acme", "--bodies", "both", "--redact-path", "messages.*.content",
                "--redact-path", "input", "--redact-pattern", r"SSN-\d+", "--retention-days", "14")
    assert scope_of(args) == ("workspace", "acme")
    assert settings_fields(args) == {"bodies": "both", "retention_days": 14,
                                     "redact_paths": ["messages.*.content", "input"], "redact_patterns": [r"SSN-\d+"]}
    args = _cli("log-settings", "set", "-w", "acme", "--key", "vk_1", "--no-redact-paths", "--no-redact-patterns")
    assert scope_of(args) == ("key", "vk_1")
    assert settings_fields(args) == {"redact_paths": [], "redact_patterns": []}
    assert settings_fields(_cli("log-settings", "set")) == {}
    assert _cli("log-settings", "get", "logset_1").id == "logset_1"
    assert _cli("log-settings", "delete", "--key", "vk_1").key == "vk_1"
    assert callable(_cli("bodies", "sweep").fn)


def test_openapi_lists_the_routes() -> None:
    doc = openapi_document()
    paths = doc["paths"]
    assert {"post", "get"} <= set(paths["/admin/v1/log-settings"])
    assert {"get", "patch", "delete"} <= set(paths["/admin/v1/log-settings/{id}"])
    sweep = paths["/admin/v1/bodies/sweep"]["post"]
    assert "retention" in sweep["summary"] and "202" not in sweep["responses"]
    assert {"SetLogSettings", "PatchLogSettings"} <= set(doc["components"]["schemas"])
