"""Fixtures shared by the integration suites that need a Redis of their own (not the stack's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.services import Service, start_redis


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A redis-server from the project's launcher for one test module; resumed before the stop
    (a test may leave it paused)."""
    svc = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield svc
    finally:
        svc.resume()
        svc.stop()
