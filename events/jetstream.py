"""JetStream resources: the event stream and the config KV bucket, created idempotently."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

DUPLICATE_WINDOW_S = 600.0
KV_HISTORY = 5


def stream_subjects(subject_prefix: str) -> list[str]:
    return [f"{subject_prefix}.>"]


async def connect(url: str, name: str) -> NATS:
    """Connect with unbounded reconnects: a worker must outlive a NATS restart.

    `url` may list several servers separated by commas (a NATS cluster).
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    return await nats.connect(
        servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True
    )


async def ensure_stream(js: JetStreamContext, name: str, subject_prefix: str, replicas: int = 1) -> None:
    """Create the event stream, or update its config to what we expect. Idempotent."""
    config = StreamConfig(
        name=name,
        subjects=stream_subjects(subject_prefix),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        max_msg_size=1024 * 1024,
    )
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(config)
        return
    # Never lower durability: a process started without ALEPHANT_STREAM_REPLICAS must not turn an
    # R3 stream into R1.
    config.num_replicas = max(replicas, info.config.num_replicas or 1)
    await js.update_stream(config)


async def ensure_kv(js: JetStreamContext, bucket: str, replicas: int = 1) -> KeyValue:
    """Create (or open) the config snapshot bucket. Idempotent."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=KV_HISTORY, replicas=replicas, storage=StorageType.FILE)
        )
