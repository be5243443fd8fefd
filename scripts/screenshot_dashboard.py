"""Takes docs/dashboard.png: a scheduler (on a private Redis) with a few SDK nodes, jobs running,
finished and failed, one pool paused, and the dashboard in Debian's chromium (/usr/bin/chromium, driven
by Playwright, as in tests/test_dashboard.py).

Usage: .venv/bin/python scripts/screenshot_dashboard.py [--out docs/dashboard.png]"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from lingua_scheduler.server.app import create_server, resolve_partitions
from lingua_scheduler.server.embedded import EmbeddedRedis
from lingua_scheduler.server.settings import Settings
from lingua_sdk import Assignment, AsyncClient, FatalError, JobSpec, Node
from playwright.async_api import async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


async def shoot(out: Path) -> None:
    redis = EmbeddedRedis(tempfile.mkdtemp(prefix="lingua-shot-"), persistent=False).start()
    app = create_server(await resolve_partitions(Settings(listen="127.0.0.1:0", redis_url=redis.url,
                                                           http_listen="127.0.0.1:0")))
    await app.start()
    target = f"127.0.0.1:{app.port}"
    hold = asyncio.Event()  # the last few jobs of each pool run until the picture is taken

    async def work(a: Assignment) -> dict[str, Any]:
        if a.spec.utterance_index % 5 == 3:
            raise FatalError("the audio could not be decoded", code="BAD_AUDIO")
        if a.spec.utterance_index >= (12 if a.spec.src_lang == "zh" else 14):
            await hold.wait()  # held: 3 of zh:en, 2 of en:de, so gpu-a1 (6 slots) always has one for the rest
        return {"text_asr": "...", "text_translated": "..."}

    nodes = [
        Node(target, node_id="gpu-a1", pairs=["zh:en", "en:de"], concurrency=6, handler=work,
             labels={"gpu": "a100", "zone": "eu-1"}, handle_signals=False),
        Node(target, node_id="gpu-a2", pairs=["zh:en"], concurrency=4, handler=work,
             labels={"gpu": "a100", "zone": "eu-2"}, handle_signals=False),
        Node(target, node_id="cpu-b1", pairs=["en:fr"], concurrency=2, handler=work,
             labels={"gpu": "none", "zone": "eu-1"}, handle_signals=False),
    ]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        async with AsyncClient(target) as client:
            await client.pause_pool("en:fr", reason="model upgrade")
            jobs = [JobSpec(tenant_id="acme", session_id="call-42", utterance_index=i, src_lang=src, tgt_lang=tgt,
                            payload=b"audio")
                    for i in range(16) for src, tgt in (("zh", "en"), ("en", "de"), ("en", "fr"))]
            submitted = await client.submit_many(jobs)
            await asyncio.gather(*(client.wait(s.job_id, timeout=30) for s, spec in zip(submitted, jobs, strict=True)
                                   if spec.utterance_index < (12 if spec.src_lang == "zh" else 14)
                                   and spec.tgt_lang != "fr"))
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
            assert app.http is not None
            await page.goto(f"http://127.0.0.1:{app.http.port}/")
            await expect(page.locator('#pools tr[data-pool="zh:en"]')).to_be_visible(timeout=15_000)
            await expect(page.locator("#nodes tbody tr")).to_have_count(3, timeout=15_000)
            # A node's load is as of its registry entry's last renewal (every node_ttl / 3).
            await expect(page.locator('#nodes tr[data-node="gpu-a2"] [data-field="load"]')).not_to_contain_text(
                "0 / 4", timeout=30_000)
            await page.fill("#search-job", submitted[3 * 3].job_id)  # utterance 3, zh:en: failed
            await page.click("#search-form button[type=submit]")
            await expect(page.locator("article.job")).to_have_count(1, timeout=15_000)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
        print(f"wrote {out}")
    finally:
        hold.set()
        for node in nodes:
            node.abort()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        await app.stop(grace=0)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "dashboard.png")
    asyncio.run(shoot(parser.parse_args().out))


if __name__ == "__main__":
    main()
