"""Closed-loop HTTP load generator for one benchmark scenario; prints one JSON object.

``python -m tests.bench.loadgen --url http://127.0.0.1:9999/v1 --connections 32 [--stream] [--max-tokens 64]``

``--connections`` workers share a keep-alive pool of that many connections; each sends a
chat completion, reads the whole response, and immediately sends the next. Requests that
complete during the first ``--warmup`` seconds are discarded; the measured window is the
following ``--duration`` seconds. A request counts in the window if it *completes* inside it;
after the window no new request starts, and in-flight ones are awaited but not counted.

A request is an error when the status is not 2xx, the transport fails, or a stream does not
end with ``data: [DONE]``. Latencies are wall-clock from just before sending to the last byte
(``latency``) and, for streams, to the first body byte (``ttfb``). Units: milliseconds.

Output (stdout, one line): ``{"label", "url", "stream", "connections", "duration_s",
"requests", "errors", "error_kinds": {kind: count}, "rps", "p50_ms", "p90_ms", "p99_ms",
"max_ms", "mean_ms", "ttfb_p50_ms", "ttfb_p99_ms", "completed"}``. ``requests`` and ``rps`` count
successes only; the ttfb fields are ``null`` when not streaming, and every latency field is
``null`` when nothing succeeded. ``completed`` counts every request that got an answer or failed
during the whole run (warm-up, window and the in-flight tail, errors included): what the server
handled, the denominator for server CPU per request measured around this process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

PROMPT = "Reply with a short friendly greeting for the benchmark."
_DONE_TAIL = b"data: [DONE]\n\n"


@dataclass(slots=True)
class _Tally:
    """Mutable per-run accumulator shared by the workers of one event loop."""

    latencies_ns: list[int] = field(default_factory=list)
    ttfbs_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    completed: int = 0


def chat_body(model: str, *, stream: bool, max_tokens: int | None = None) -> bytes:
    """The benchmark request body: one short user message, ``stream_options`` when streaming,
    ``max_tokens`` when given."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return msgspec.json.encode(body)


def varied(model: str, stream: bool, max_tokens: int | None) -> Callable[[], bytes]:
    """Bodies like `chat_body`'s whose prompt ends in a counter: no two requests are the same."""
    counter = itertools.count()
    template = chat_body(model, stream=stream, max_tokens=max_tokens)
    marker = PROMPT.encode()

    def body() -> bytes:
        return template.replace(marker, marker + f" #{next(counter)}".encode(), 1)
    return body


def percentile(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank ``q``-quantile (0 < q <= 1) of sorted nanoseconds, in milliseconds."""
    if not sorted_ns:
        return None
    rank = max(1, min(len(sorted_ns), int(q * len(sorted_ns) + 0.999999)))
    return sorted_ns[rank - 1] / 1e6


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> tuple[str | None, int, int]:
    """Send one request; return ``(error kind or None, ttfb ns, latency ns)``."""
    start = time.perf_counter_ns()
    ttfb = 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if stream:
                tail = b""
                first = True
                while True:
                    data = await resp.content.readany()
                    if not data:
                        break
                    if first:
                        ttfb = time.perf_counter_ns() - start
                        first = False
                    tail = (tail + data)[-len(_DONE_TAIL) :]
                if resp.status >= 300:
                    kind: str | None = f"http {resp.status}"
                elif tail != _DONE_TAIL:
                    kind = "stream without [DONE]"
                else:
                    kind = None
            else:
                await resp.read()
                kind = f"http {resp.status}" if resp.status >= 300 else None
    except (aiohttp.ClientError, TimeoutError) as exc:
        kind = type(exc).__name__
    return kind, ttfb, time.perf_counter_ns() - start


async def run(
    *,
    url: str,
    headers: dict[str, str],
    body: bytes | Callable[[], bytes],
    stream: bool,
    connections: int,
    warmup_s: float,
    duration_s: float,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Run one scenario and return its summary (see the module docstring for the fields)."""
    tally = _Tally()
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    started = time.perf_counter_ns()
    window_start = started + int(warmup_s * 1e9)
    window_end = window_start + int(duration_s * 1e9)

    async def worker() -> None:
        while time.perf_counter_ns() < window_end:
            kind, ttfb, latency = await _one(session, url, body() if callable(body) else body, headers, stream)
            done = time.perf_counter_ns()
            tally.completed += 1
            if not window_start <= done <= window_end:
                continue
            if kind is not None:
                tally.errors[kind] += 1
                continue
            tally.latencies_ns.append(latency)
            if stream:
                tally.ttfbs_ns.append(ttfb)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker() for _ in range(connections)))

    lat = sorted(tally.latencies_ns)
    ttfb = sorted(tally.ttfbs_ns)
    ok = len(lat)
    return {
        "url": url,
        "stream": stream,
        "connections": connections,
        "duration_s": duration_s,
        "requests": ok,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "rps": ok / duration_s if duration_s > 0 else 0.0,
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": lat[-1] / 1e6 if lat else None,
        "mean_ms": sum(lat) / ok / 1e6 if ok else None,
        "ttfb_p50_ms": percentile(ttfb, 0.50) if stream else None,
        "ttfb_p99_ms": percentile(ttfb, 0.99) if stream else None,
        "completed": tally.completed,
    }


def _parse_header(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {raw!r}")
    return name.strip(), value.strip()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:9999/v1")
    parser.add_argument("--api-key", default="sk-bench", help="sent as 'Authorization: Bearer <key>'")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    parser.add_argument("--stream", action="store_true", help="stream with stream_options.include_usage")
    parser.add_argument("--max-tokens", type=int, help="max_tokens in every request (default: none)")
    parser.add_argument("--header", action="append", type=_parse_header, default=[], help="'Name: value'")
    parser.add_argument("--label", default="", help="copied into the output")
    parser.add_argument("--vary", action="store_true",
                        help="a different prompt every request (a counter appended): never an exact cache hit")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}", "Content-Type": "application/json"}
    headers.update(dict(args.header))
    result = await run(
        url=args.url.rstrip("/") + "/chat/completions",
        headers=headers,
        body=varied(args.model, args.stream, args.max_tokens) if args.vary else
        chat_body(args.model, stream=args.stream, max_tokens=args.max_tokens),
        stream=args.stream,
        connections=args.connections,
        warmup_s=args.warmup,
        duration_s=args.duration,
    )
    return {"label": args.label, **result}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: run one scenario (uvloop when installed) and print its JSON summary."""
    args = _parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_main(args))
    else:
        result = uvloop.run(_main(args))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()
