"""How long the console's pages take on a workspace with many calls (issue 15: under 1 s at 1M).

``python -m tests.bench.console_pages [--rows 1000000] [--repeat 5] [--state-dir DIR] [--json]``

Starts a local stack of its own (embedded NATS, Postgres, Redis; no demo activity), loads
``--rows`` finance facts into its database with COPY (tests/bench/finance_queries.py's data,
spread over the last 30 days, each run's calls within 30 minutes; 70% of them in the `demo`
workspace), ANALYZEs, signs in to the
console over HTTP and times each page of the `demo` workspace: one warm-up, then ``--repeat``
GETs, median, min and max of the whole response (server time: every number on a page comes from
the finance projection). With Chromium present it also times the overview in a real browser,
from navigation to the `load` event, charts drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from deploy.stack import Stack
from tests.bench.finance_queries import load

PAGES = ("/console", "/console?g=hour&by=provider", "/console/runs", "/console/agents", "/console/policy",
         "/console/providers", "/console/live")
TARGET_MS = 1000.0
RUN_SPAN_S = 1800.0  # a run's calls fall within 30 minutes


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _sign_in(http: aiohttp.ClientSession, base: str, token: str) -> None:
    async with http.get(f"{base}/console/login") as resp:
        nonce = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert nonce is not None
    async with http.post(f"{base}/console/login", data={"csrf": nonce.group(1), "token": token, "name": "bench"},
                         allow_redirects=False) as resp:
        assert resp.status == 303, resp.status


async def time_pages(base: str, token: str, repeat: int) -> list[dict[str, Any]]:
    results = []
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await _sign_in(http, base, token)
        for path in PAGES:
            samples = []
            for i in range(repeat + 1):
                started = time.perf_counter()
                async with http.get(base + path) as resp:
                    await resp.read()
                    status = resp.status
                if i:
                    samples.append((time.perf_counter() - started) * 1000)
            results.append({"page": path, "status": status, "median_ms": round(statistics.median(samples), 1),
                            "min_ms": round(min(samples), 1), "max_ms": round(max(samples), 1)})
    return results


async def browser_load(base: str, token: str, repeat: int) -> dict[str, Any] | None:
    """The overview in headless Chromium: navigation start to `load`, median of `repeat`."""
    from tests.browser.conftest import CHROMIUM_ARGS, chromium_path, sign_in

    path = chromium_path()
    if path is None:
        return None
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        page = await (await browser.new_context()).new_page()
        await sign_in(page, base, token)
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            await page.goto(base + "/console", wait_until="load")
            await page.wait_for_function("() => window.Chart && Chart.getChart('cost-chart')")
            samples.append((time.perf_counter() - started) * 1000)
        await browser.close()
    return {"page": "/console (Chromium, to load + chart)", "median_ms": round(statistics.median(samples), 1),
            "min_ms": round(min(samples), 1), "max_ms": round(max(samples), 1)}


def run(rows: int, repeat: int, state_dir: Path) -> dict[str, Any]:
    stack = Stack(state_dir=state_dir, port=0, admin_port=0, log=lambda _m: None)
    say("==> console pages: starting a stack")
    stack.start()
    try:
        now = dt.datetime.now(dt.UTC)
        say(f"==> loading {rows:,} finance facts over the last 30 days (COPY)")
        loaded_s = load(stack.child_env()["ALEPHANT_DATABASE_URL"], rows, start=now - dt.timedelta(days=30),
                        end=now, workspaces=("demo", "ws1", "ws2", "ws3"), run_span_s=RUN_SPAN_S)
        token = stack.demo["ALEPHANT_ADMIN_TOKEN"]
        say(f"==> timing {len(PAGES)} pages, {repeat} times each")
        pages = asyncio.run(time_pages(stack.admin_url, token, repeat))
        chromium = asyncio.run(browser_load(stack.admin_url, token, repeat))
    finally:
        stack.stop()
    return {"rows": rows, "demo_rows": int(rows * 0.7), "load_s": round(loaded_s, 1), "pages": pages,
            "chromium": chromium, "target_ms": TARGET_MS}


def lines(doc: dict[str, Any]) -> list[str]:
    out = [f"Console pages over {doc['rows']:,} finance facts (~{doc['demo_rows']:,} in the shown workspace); "
           f"target < {doc['target_ms']:.0f} ms"]
    for p in [*doc["pages"], *([doc["chromium"]] if doc["chromium"] else [])]:
        verdict = "ok" if p["median_ms"] < doc["target_ms"] else "OVER"
        out.append(f"  {p['page']:<40} median {p['median_ms']:>7.1f} ms  (min {p['min_ms']:.1f}, "
                   f"max {p['max_ms']:.1f})  {verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=1_000_000, help="finance facts to load (default 1000000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed loads per page after a warm-up (default 5)")
    ap.add_argument("--state-dir", type=Path, help="where the stack keeps its state (default: a temporary dir)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    scratch = None
    if args.state_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix="alephant-console-bench-"))
    try:
        doc = run(args.rows, args.repeat, args.state_dir or scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(doc, indent=2) if args.json else "\n".join(lines(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
