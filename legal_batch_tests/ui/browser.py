"""A real headless Chromium (Debian's /usr/bin/chromium), driven over the DevTools protocol: open a
page, wait for what a person would wait for, click by visible text, save a screenshot."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import websocket  # websocket-client

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--hide-scrollbars", "--mute-audio"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no chromium on PATH: `apt-get install chromium` (what `make ui-check` does)")


class Page:
    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def send(self, method: str, **params: object) -> dict:
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def open(self, url: str, *, width: int = 1600, height: int = 1000) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def wait_for_text(self, text: str, *, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        probe = f"document.body !== null && document.body.innerText.includes({json.dumps(text)})"
        while not self.evaluate(probe):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} did not appear in {timeout_s:.0f} s")
            time.sleep(0.5)

    def click_text(self, text: str) -> None:
        """Click what shows exactly `text` (a button, a link, a menu or settings row: its switch or
        checkbox when it has one)."""
        clicked = self.evaluate(f"""(() => {{
            const wanted = {json.dumps(text)};
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            for (let node = walker.nextNode(); node; node = walker.nextNode()) {{
                const element = node.parentElement;
                if (node.nodeValue.trim() !== wanted || !element || !element.getClientRects().length) continue;
                const row = element.closest('label, button, a, [role=button], [role=menuitem], li') || element;
                const toggle = row.querySelector('input[type=checkbox]') || element.parentElement.querySelector(
                    'input[type=checkbox]');
                (toggle || row).click();
                return true;
            }}
            return false;
        }})()""")
        if not clicked:
            raise LookupError(f"nothing to click with the text {text!r}")

    def click_selector(self, selector: str) -> None:
        clicked = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return false;
            (e.closest('button, a, [role=button]') || e).click();
            return true;
        }})()""")
        if not clicked:
            raise LookupError(f"nothing matches {selector!r}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


@contextlib.contextmanager
def chromium(port: int) -> Iterator[Page]:
    """A headless Chromium with its DevTools endpoint on `port`, and one blank page; both closed on exit."""
    profile = Path(tempfile.mkdtemp(prefix="lb-chromium-"))
    process = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    page: Page | None = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    targets = [t for t in json.loads(response.read()) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {process.poll()})")
            time.sleep(0.3)
        page = Page(targets[0]["webSocketDebuggerUrl"])
        yield page
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
