"""Screenshot TensorBoard's Custom Scalars tab with headless Chromium over the DevTools protocol (stdlib only).

usage: python cdp_shot.py TENSORBOARD_URL OUT.png
"""

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

URL, OUT = sys.argv[1], sys.argv[2]
PORT = 9333


class WS:
    def __init__(self, url: str) -> None:
        assert url.startswith("ws://")
        hostport, path = url[5:].split("/", 1)
        host, port = hostport.split(":")
        self.s = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.s.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.n = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        self.s.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> dict:
        message = b""
        while True:
            b1, b2 = self._recv_exact(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._recv_exact(8))[0]
            message += self._recv_exact(n)
            if b1 & 0x80:
                return json.loads(message)

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.send({"id": self.n, "method": method, "params": params})
        while True:
            msg = self.recv()
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]


DEEP = """
function deepAll(sel, root = document) {
  const out = [...root.querySelectorAll(sel)];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) out.push(...deepAll(sel, el.shadowRoot));
  return out;
}
"""

profile = tempfile.mkdtemp()
chrome = subprocess.Popen(
    [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1400,1200",
        f"--remote-debugging-port={PORT}",
        "--remote-debugging-address=127.0.0.1",
        "about:blank",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    for _ in range(100):
        try:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/json/list", timeout=2))
            if any(t["type"] == "page" for t in targets):
                break
        except OSError:
            pass
        time.sleep(0.2)
    page = next(t for t in targets if t["type"] == "page")
    ws = WS(page["webSocketDebuggerUrl"])
    ws.call("Page.enable")
    ws.call("Emulation.setDeviceMetricsOverride", width=1400, height=1200, deviceScaleFactor=1, mobile=False)
    base = URL.split("#")[0]
    ws.call("Page.navigate", url=base)
    time.sleep(3)
    # settings the dashboard keeps in localStorage: show the spikes (no outlier clipping)
    ws.call("Runtime.evaluate", expression="localStorage.setItem('_ignoreYOutliers', 'false')")
    ws.call("Page.navigate", url=URL)
    time.sleep(8)
    print(ws.call("Runtime.evaluate", expression="localStorage.getItem('_ignoreYOutliers')"))

    def centres(selector: str) -> list:
        r = ws.call(
            "Runtime.evaluate",
            expression=DEEP
            + f"(() => deepAll('{selector}').map(e => {{ const b = e.getBoundingClientRect();"
            + " return [b.x + b.width / 2, b.y + b.height / 2]; }))()",
            returnByValue=True,
        )
        return r["result"]["value"]

    def click(x: float, y: float) -> None:
        ws.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            ws.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        time.sleep(1.0)

    # widen the first chart (gradient norm), then open the legend ("Matches (n)") of every chart, one at a time
    full = centres("paper-icon-button[icon=fullscreen]")
    print("fullscreen buttons", full)
    if full:
        click(*full[0])
    for k in range(len(centres("paper-icon-button.toggle-matches-button"))):
        click(*centres("paper-icon-button.toggle-matches-button")[k])
    ws.call("Input.dispatchMouseEvent", type="mouseMoved", x=5, y=1190)  # no hover tooltip in the picture
    time.sleep(4)
    shot = ws.call("Page.captureScreenshot", format="png")
    with open(OUT, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    print("wrote", OUT)
finally:
    chrome.terminate()
    chrome.wait(timeout=10)
