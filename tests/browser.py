"""Headless Chromium driven over the DevTools protocol, for what --dump-dom cannot see: the
documents inside a page's frames (MLflow's artifact viewer shows an HTML artifact in a
sandboxed frame), whether their images loaded, and a screenshot once they have."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1600,1100",
         # One process for the page and its frames, so that a sandboxed frame's document is reachable from the page.
         "--disable-site-isolation-trials", "--disable-features=IsolateSandboxedIframes,site-per-process"]

# What each frame's images are: alt text, whether loaded, natural size, and where from.
IMAGES_JS = ("JSON.stringify([...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, "
             "height: i.naturalHeight, src: i.currentSrc.slice(0, 30)})))")
TEXT_JS = "document.body ? document.body.innerText : ''"


async def _frames(url: str, profile: Path, timeout: float, screenshot: Path | None, ready, scroll_to: str | None) -> list[dict[str, Any]]:
    import aiohttp

    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.time() < deadline and proc.poll() is None, "chromium did not start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params):
                    n = next(ids)
                    await ws.send_json({"id": n, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == n:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg["result"]

                await call("Page.enable")
                await call("Page.navigate", url=url)
                deadline = time.time() + timeout
                frames: list[dict[str, Any]] = []
                while time.time() < deadline:
                    frames = []
                    tree = (await call("Page.getFrameTree"))["frameTree"]
                    stack = [tree]
                    while stack:
                        node = stack.pop()
                        stack.extend(node.get("childFrames", []))
                        frame = node["frame"]
                        world = await call("Page.createIsolatedWorld", frameId=frame["id"], worldName="check")
                        out = {"url": frame["url"], "id": frame["id"]}
                        for key, js in (("images", IMAGES_JS), ("text", TEXT_JS)):
                            res = await call("Runtime.evaluate", expression=js, contextId=world["executionContextId"],
                                             returnByValue=True)
                            value = res["result"].get("value")
                            out[key] = json.loads(value) if key == "images" and value else (value or "")
                        frames.append(out)
                    if ready(frames):
                        break
                    await asyncio.sleep(0.5)
                if screenshot is not None:
                    if scroll_to:  # bring an element of a frame into view first
                        for f in frames:
                            world = await call("Page.createIsolatedWorld", frameId=f["id"], worldName="scroll")
                            await call("Runtime.evaluate", contextId=world["executionContextId"],
                                       expression=f"document.getElementById({json.dumps(scroll_to)})?.scrollIntoView()")
                        await asyncio.sleep(0.5)
                    shot = await call("Page.captureScreenshot", format="png")
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                return frames
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def frames(url: str, profile: Path, timeout: float = 60, screenshot: Path | None = None, ready=lambda frames: False,
           scroll_to: str | None = None) -> list[dict[str, Any]]:
    """Every frame of the page at ``url`` (the page first or among them): its URL, its images
    (alt, loaded, natural size) and visible text; read again until ``ready(frames)`` or
    ``timeout``, then a screenshot of the page when asked (with the element ``scroll_to``, an
    id, scrolled into view in whichever frame has it)."""
    profile.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_frames(url, profile, timeout, screenshot, ready, scroll_to))
