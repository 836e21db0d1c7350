"""NATS down across a graceful worker restart loses nothing (issue 7, item 2).

With NATS paused (SIGSTOP), the worker keeps answering from its snapshot and spools every
event; `/healthz` counts them as pending (batch in flight included). A graceful restart
(SIGTERM) keeps the spool on disk and logs how many are pending; the next worker publishes
them once NATS is back. Runs on a dedicated stack.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from deploy.stack import Stack
from tests.conftest import dedicated_stack, eventually
from tests.fault.test_crash import journalled_request_ids

CALLS = 50


@pytest.fixture(scope="module")
def nats_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with dedicated_stack(Path(tmp_path_factory.mktemp("natsdown"))) as stack:
        yield stack


async def test_nats_down_graceful_restart_keeps_every_event(nats_stack: Stack) -> None:
    stack, run_id = nats_stack, f"natsdown-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {stack.demo['ALEPHANT_API_KEY']}", "Alephant-Run-Id": run_id}
    answered: set[str] = set()
    async with aiohttp.ClientSession() as http:
        stack.services["nats"].pause()
        try:
            for i in range(CALLS):
                body = {"model": "mock/echo", "messages": [{"role": "user", "content": f"nats is down {i}"}]}
                async with http.post(f"{stack.origin}/v1/chat/completions", json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    answered.add(resp.headers["Alephant-Request-Id"])
            async with http.get(f"{stack.origin}/healthz") as resp:
                pending_while_down = (await resp.json())["events_pending"]
            log = stack.procs["dataplane-0"].log
            assert log is not None
            offset = log.stat().st_size
            await asyncio.to_thread(stack.kill, "dataplane-0", signal.SIGTERM)
            exit_code = stack.procs["dataplane-0"].proc.returncode  # type: ignore[union-attr]
            shutdown = [json.loads(line) for line in log.read_bytes()[offset:].splitlines()
                        if b"events_not_flushed_on_shutdown" in line]
            # Start the next worker, and let NATS come back while it connects.
            starting = asyncio.create_task(asyncio.to_thread(stack.start_worker, 0))
            await asyncio.sleep(1.0)
        finally:
            stack.services["nats"].resume()
        await starting
    database_url = stack.child_env()["ALEPHANT_DATABASE_URL"]

    async def all_journalled() -> set[str] | None:
        found = await journalled_request_ids(database_url, run_id)
        return found if answered <= found else None

    journalled = await eventually(all_journalled, timeout=60)
    logged_pending = shutdown[0]["pending"] if shutdown else None
    print(f"nats down: answered {len(answered)}, /healthz pending while down {pending_while_down}, "
          f"shutdown log pending {logged_pending} (exit {exit_code}), journalled {len(journalled & answered)}, "
          f"lost {len(answered - journalled)}")
    assert len(answered) == CALLS
    assert pending_while_down >= CALLS
    assert logged_pending is not None and logged_pending >= CALLS
    assert answered <= journalled
