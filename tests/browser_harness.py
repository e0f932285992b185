"""A real headless Chromium for the tests, driven over the Chrome DevTools Protocol on a pipe.

- Debian's `chromium` package, installed like tests/slurm_harness.py installs SLURM: apt-get as root or
  through passwordless sudo, `--no-install-recommends`, `apt-get update` only when the install fails.
  `BrowserUnavailable` (the skip reason) only where that is impossible.
- `--remote-debugging-pipe`: the protocol runs over file descriptors 3 and 4 (NUL-terminated JSON), so no
  port is opened, no websocket client or webdriver is needed, and no Python dependency is added.
- No network: the browser resolves no host name and talks only to a dead proxy; every request a page
  makes is recorded (`Page.requests`) so a test can assert that only the page's own file and data: URIs
  were loaded; console errors, uncaught exceptions and failed loads are recorded as `Page.errors`.
- The browser is started with a fresh `--user-data-dir` and stopped by its pid only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PACKAGES = ("chromium",)
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
    # nothing can leave: no name resolves, and any connection would go to a closed local port
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--allow-file-access-from-files",
    "--force-device-scale-factor=1",
    "--remote-debugging-pipe",
)


class BrowserUnavailable(RuntimeError):
    """Chromium cannot be installed or started here; the message is the skip reason."""


class ProtocolError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


# ---------------------------------------------------------------------------------------------- install
def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


def find_chromium() -> str | None:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium(log: Callable[[str], None] = lambda s: None) -> str:
    """Path of a Chromium binary, installing Debian's package if needed. Raises BrowserUnavailable."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0:
        r = (
            subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
            if shutil.which("sudo")
            else None
        )
        if r is None or r.returncode != 0:
            raise BrowserUnavailable(
                "Chromium is not installed and installing it needs root or passwordless sudo"
            )
    if not shutil.which("apt-get"):
        raise BrowserUnavailable("Chromium is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [
        *_sudo(),
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        *PACKAGES,
    ]
    log(f"installing {' '.join(PACKAGES)}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    if r.returncode != 0:
        log("apt-get install failed; running apt-get update and retrying")
        subprocess.run(
            [*_sudo(), "apt-get", "update", "-q"], capture_output=True, timeout=600, env=env, check=False
        )
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    found = find_chromium()
    if r.returncode != 0 or not found:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
        raise BrowserUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: {tail}")
    return found


# ---------------------------------------------------------------------------------------------- protocol
class Browser:
    """One headless Chromium process and its DevTools pipe."""

    def __init__(self, binary: str, timeout: float = 30.0):
        self.binary = binary
        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="footprints-chromium-"))
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._listeners: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self.stderr_path = self.profile / "stderr.log"
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on fds 3 (commands in) and 4 (replies out)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        args = [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=wire,
                pass_fds=(3, 4),
                close_fds=True,
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        try:
            self.version = self.call("Browser.getVersion", timeout=60)
        except ProtocolError as err:
            self.close()
            raise BrowserUnavailable(f"{binary} did not start: {err}; {self._stderr_tail()}") from None

    def _stderr_tail(self) -> str:
        try:
            return " | ".join(self.stderr_path.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    for cb in list(self._listeners.get(msg.get("sessionId", ""), [])):
                        cb(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
            msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        return msg_id

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        msg_id = self.send(method, params, session)
        end = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while msg_id not in self._replies:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    why = "browser exited" if self.proc.poll() is not None else "timeout"
                    raise ProtocolError(f"{method}: no answer ({why})")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def listen(self, session: str, callback: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.setdefault(session, []).append(callback)

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, target, session, width, height)

    def close(self) -> None:
        """Stop this browser (its pid only) and remove its profile."""
        if self.proc.poll() is None:
            try:
                self.send("Browser.close")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: navigation, script evaluation, real mouse clicks, screenshots; records requests and errors."""

    def __init__(self, browser: Browser, target: str, session: str, width: int, height: int):
        self.browser, self.target, self.session = browser, target, session
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.loaded = threading.Event()
        browser.listen(session, self._on_event)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _on_event(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            self.errors.append(
                f"load failed: {p.get('errorText')} ({p.get('blockedReason') or p.get('type')})"
            )
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append(
                "console."
                + p["type"]
                + ": "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(
                "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
            )
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Page.loadEventFired":
            self.loaded.set()

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.loaded.clear()
        r = self.call("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise ProtocolError(f"navigate {url}: {r['errorText']}")
        if not self.loaded.wait(timeout):
            raise ProtocolError(f"{url}: no load event within {timeout} s")

    def eval(self, expression: str, timeout: float | None = None) -> Any:
        r = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout,
        )
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise ProtocolError(
                f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}"
            )
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 15.0, interval: float = 0.05) -> Any:
        """Poll a JS expression until it is truthy; returns its value. Raises on timeout, and at once when
        the page has thrown an uncaught exception (it will not get better by waiting)."""
        end = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            thrown = [e for e in self.errors if e.startswith("exception")]
            if thrown:
                raise ProtocolError(f"the page threw while waiting for {expression}: {thrown}")
            if time.monotonic() > end:
                raise ProtocolError(
                    f"timed out after {timeout} s waiting for: {expression} (errors: {self.errors})"
                )
            time.sleep(interval)

    def wait_for_python(
        self, predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1
    ) -> None:
        """Poll a Python check of the page (e.g. of a screenshot) until it holds (raises on timeout)."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise ProtocolError(f"timed out after {timeout} s waiting for {predicate.__name__}")
            time.sleep(interval)

    def click(self, x: float, y: float) -> None:
        """A real left click (press + release) at viewport coordinates."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            params: dict[str, Any] = {"type": kind, "x": x, "y": y}
            if kind != "mouseMoved":
                params.update(button="left", clickCount=1)
            self.call("Input.dispatchMouseEvent", params)

    def click_selector(self, selector: str) -> None:
        """Scroll the element into view and click its centre."""
        rect = self.eval(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            if (!el) return null; el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if rect is None:
            raise ProtocolError(f"no element {selector}")
        self.click(*rect)

    def screenshot(
        self, clip: Sequence[float] | None = None, fmt: str = "png", quality: int | None = None
    ) -> bytes:
        params: dict[str, Any] = {"format": fmt, "captureBeyondViewport": False}
        if quality is not None:
            params["quality"] = quality
        if clip is not None:
            x, y, w, h = clip
            params["clip"] = {"x": x, "y": y, "width": w, "height": h, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])

    def close(self) -> None:
        try:
            self.browser.call("Target.closeTarget", {"targetId": self.target}, timeout=10)
        except ProtocolError:
            pass


def start_browser(log: Callable[[str], None] = lambda s: None) -> Browser:
    """Install if needed and start Chromium; raises BrowserUnavailable with the reason."""
    binary = ensure_chromium(log)
    return Browser(binary)


def screenshot(html: Path, out_png: Path, width: int = 1280, height: int = 860, colours: int = 256) -> int:
    """A screenshot of a report page as it first opens (e.g. the README's), saved as a palette PNG to stay
    small; returns its size in bytes."""
    from PIL import Image

    browser = start_browser()
    try:
        page = browser.new_page(width, height)
        page.goto(Path(html).resolve().as_uri())
        page.wait_for("window.footprintsReport && window.footprintsReport.ready")
        page.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        if page.errors:
            raise ProtocolError(f"{html}: {page.errors}")
        import io

        img = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    finally:
        browser.close()
    img.quantize(colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        out_png, optimize=True
    )
    return Path(out_png).stat().st_size


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Screenshot a footprints report page with headless Chromium."
    )
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument("--colours", type=int, default=256)
    a = parser.parse_args()
    size = screenshot(a.html, a.png, a.width, a.height, a.colours)
    print(f"{a.png}: {size} bytes", file=sys.stderr)
