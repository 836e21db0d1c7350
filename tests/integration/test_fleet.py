"""The fleet view (issue 8): workers report the config revision they applied; the control plane
lists them at GET /admin/v1/fleet, and `alephant ... --wait` returns once every live worker has
applied a change. Against the session stack (real NATS, with the bus roles' permissions)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

from deploy.admin_cli import wait_for_fleet
from tests.conftest import Gateway, eventually, run_cli


def _fleet(gateway: Gateway) -> dict[str, Any]:
    fleet: dict[str, Any] = gateway.admin.call("GET", "/admin/v1/fleet")
    return fleet


async def test_fleet_lists_the_workers_with_the_revision_of_a_change_just_made(gateway: Gateway) -> None:
    created = await asyncio.to_thread(gateway.admin.call, "POST", "/admin/v1/agents",
                                      {"workspace_id": "demo", "name": f"fleet-{uuid.uuid4().hex[:8]}"})
    revision = created["snapshot_revision"]
    assert isinstance(revision, int) and revision > 0

    async def applied() -> dict[str, Any] | None:
        fleet = await asyncio.to_thread(_fleet, gateway)
        workers = fleet["workers"]
        return fleet if workers and all(w["applied_revision"] >= revision for w in workers) else None

    fleet = await eventually(applied)
    assert fleet["revision"] >= revision
    assert len(fleet["workers"]) == gateway.stack.workers
    for worker in fleet["workers"]:
        assert set(worker) == {"worker_id", "host", "pid", "applied_revision", "stale", "last_heartbeat_ms", "age_s"}
        assert worker["stale"] is False
        assert isinstance(worker["pid"], int) and worker["age_s"] < 30



async def test_cli_wait_returns_once_every_worker_applied_the_change(gateway: Gateway) -> None:
    name = f"fleet-cli-{uuid.uuid4().hex[:8]}"
    done = await asyncio.to_thread(run_cli, gateway, "agents", "create", name, "--wait", "--wait-timeout", "30")
    assert done.returncode == 0, done.stderr
    revision = json.loads(done.stdout)["snapshot_revision"]
    assert f"alephant: snapshot revision {revision}" in done.stderr
    assert f"alephant: revision {revision} applied by {gateway.stack.workers}/{gateway.stack.workers} workers" \
        in done.stderr
    # --wait returned only once every worker had it, so the fleet shows it without waiting.
    workers = (await asyncio.to_thread(_fleet, gateway))["workers"]
    assert workers and all(w["applied_revision"] >= revision for w in workers)


async def test_cli_fleet_prints_the_fleet(gateway: Gateway) -> None:
    done = await asyncio.to_thread(run_cli, gateway, "fleet")
    assert done.returncode == 0, done.stderr
    assert {"revision", "workers"} <= set(json.loads(done.stdout))


async def test_cli_wait_times_out_for_a_revision_no_worker_has(gateway: Gateway) -> None:
    """The wait's failure path: a revision far ahead is never reached; exit 1 naming the laggards."""
    out = io.StringIO()
    reached = await asyncio.to_thread(wait_for_fleet, gateway.admin, 10**12, 0.3, out)
    assert reached is False
    text = out.getvalue()
    assert "waiting for revision" in text and "timed out" in text
