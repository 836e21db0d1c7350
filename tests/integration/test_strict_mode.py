"""Against the local stack's embedded NATS (deploy.services.start_nats, single node, so R1 only):

- `ensure_kv` leaves an R1 bucket alone when 1 is wanted, and asks the server to raise it when
  more are wanted (a single node refuses more than one replica, which shows the update was sent;
  the R3 raise itself is covered on the 3-node cluster stack);
- strict mode (`ALEPHANT_STRICT=1`): the facts are read from the server, and `alephant dataplane`
  and `alephant projector` exit non-zero naming the settings to fix before they serve.

The strict checks need only NATS (they run before a process touches Postgres or Redis), so this
suite starts NATS alone and creates the stream and bucket the way `alephant migrate` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.js.errors import APIError

from deploy.services import Service, start_nats
from deploy.strict import observe
from events.jetstream import connect, ensure_kv, ensure_stream
from schemas.settings import load_settings

STREAM, BUCKET, PREFIX = "STRICT_EVENTS", "strict_config", "strict"


@pytest.fixture(scope="module")
def nats_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_nats(tmp_path_factory.mktemp("nats"))
    try:
        yield svc
    finally:
        svc.stop()


@pytest_asyncio.fixture
async def nc(nats_service: Service) -> AsyncIterator[NATS]:
    conn = await connect(nats_service.url, "strict-tests")
    js = conn.jetstream()
    await ensure_stream(js, STREAM, PREFIX, 1)  # what `alephant migrate` makes on a single node
    await ensure_kv(js, BUCKET, 1)
    try:
        yield conn
    finally:
        await conn.close()


async def test_ensure_kv_leaves_r1_when_1_is_wanted_and_asks_for_more(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_kv(js, BUCKET, 1)
    assert (await js.stream_info(f"KV_{BUCKET}")).config.num_replicas == 1
    # A worker (raise_replicas=False, no STREAM.UPDATE right) never tries.
    await ensure_kv(js, BUCKET, 3, raise_replicas=False)
    with pytest.raises(APIError) as refused:  # the update was sent; one server cannot hold 3 copies
        await ensure_kv(js, BUCKET, 3)
    assert "replicas" in str(refused.value).lower()
    info = await js.stream_info(f"KV_{BUCKET}")
    assert info.config.num_replicas == 1 and info.config.max_msgs_per_subject == 5  # bucket config intact


def _strict_env(nats_service: Service, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEPHANT_")}
    return {**env, "ALEPHANT_STRICT": "1", "ALEPHANT_STREAM_REPLICAS": "1", "ALEPHANT_NATS_URL": nats_service.url,
            "ALEPHANT_NATS_MONITOR_URLS": nats_service.extra["monitor"], "ALEPHANT_STREAM": STREAM,
            "ALEPHANT_KV_BUCKET": BUCKET, "ALEPHANT_SUBJECT_PREFIX": PREFIX, "ALEPHANT_STATE_DIR": str(state_dir),
            "ALEPHANT_SECRET_KEY": "x" * 32, "ALEPHANT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "ALEPHANT_REDIS_URL": "redis://127.0.0.1:1/0", "ALEPHANT_PORT": "0"}


async def test_observed_facts_of_the_single_node(nc: NATS, nats_service: Service, tmp_path: Path) -> None:
    settings = load_settings(_strict_env(nats_service, tmp_path))
    facts = await observe(settings, "dataplane")
    assert (facts.stream.replicas, facts.bucket.replicas) == (1, 1)
    # The embedded server runs with the default periodic fsync.
    assert [(s.url, s.sync_always, s.error) for s in facts.servers] == [(nats_service.extra["monitor"], False, "")]
    assert facts.spool_dir == str(tmp_path / "spool") and facts.spool_error == ""


@pytest.mark.parametrize("role", ["dataplane", "projector"])
async def test_a_process_in_strict_mode_refuses_to_start_naming_the_settings(
        nc: NATS, nats_service: Service, tmp_path: Path, role: str) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.cli", role], env=_strict_env(nats_service, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    assert f"alephant {role}: strict durability mode (ALEPHANT_STRICT=1) refuses to start" in err
    assert "ALEPHANT_STREAM_REPLICAS=1" in err
    assert f"event stream {STREAM} has 1 replica(s)" in err
    if role == "dataplane":  # the projector does not read the bucket
        assert f"config bucket stream KV_{BUCKET} has 1 replica(s)" in err
    assert "does not report sync_interval: always" in err
    assert "Traceback" not in err
