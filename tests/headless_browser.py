"""Headless Chromium driven over the DevTools protocol, for tests that look at a served page.

One browser process is asked, in real time, what the page shows, and shoots it only once it shows
what the test waits for. Chromium's one-shot `--screenshot` shoots when its virtual time runs out,
whether or not the page has loaded: a loaded machine caught FiftyOne's App on its loading screen
four times in a row. The protocol travels on a pipe (`--remote-debugging-pipe`: commands in on fd
3, answers out on fd 4, each message JSON ended by a NUL byte), so no port and no websocket
library is needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


class Page:
    """One page in its own headless Chromium; `with Page(browser, profile) as page: ...`."""

    def __init__(self, browser: str, profile: Path, *, width: int = 1280, height: int = 900) -> None:
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()

        def onto_fds_3_and_4() -> None:
            # Through fds above 4 first: a pipe end may itself be fd 3 or 4. dup2 leaves the copies
            # open across exec, while every other descriptor Python made closes there.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, answers_write)]
            for fd, copy in zip((3, 4), high, strict=True):
                os.dup2(copy, fd)
                os.close(copy)

        self.stderr = profile.parent / f"{profile.name}.stderr"
        with self.stderr.open("w") as stderr:
            self._process = subprocess.Popen(
                [browser, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                close_fds=False,  # it would close fds 3 and 4 after onto_fds_3_and_4 made them
                preexec_fn=onto_fds_3_and_4,
            )
        os.close(commands_read)
        os.close(answers_write)
        self._unread = b""
        self._next_id = 0
        try:
            target = self._call(
                "Target.createTarget", url="about:blank", newWindow=True, width=width, height=height
            )
            attached = self._call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        except BaseException:
            self.close()
            raise
        self._session = attached["sessionId"]

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, session: str | None = None, **params: object) -> dict:
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events arrive between answers; only this command's answer is wanted
            answer = json.loads(self._message())
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def _message(self) -> bytes:
        while b"\0" not in self._unread:
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed its pipe: {self.stderr.read_text()[-3000:]}")
            self._unread += chunk
        message, _, self._unread = self._unread.partition(b"\0")
        return message

    def open(self, url: str) -> None:
        self._call("Page.navigate", self._session, url=url)

    def evaluate(self, expression: str) -> object:
        done = self._call("Runtime.evaluate", self._session, expression=expression, returnByValue=True)
        return done["result"].get("value")

    def html(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def text(self) -> str:
        """What a reader sees: the rendered text, without markup or hidden elements."""
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def screenshot(self, path: Path) -> None:
        shot = self._call("Page.captureScreenshot", self._session, format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    def wait_until(self, shown: Callable[[Page], bool], seconds: float) -> bool:
        """Poll `shown(page)` in real time until it holds or the seconds pass."""
        deadline = time.monotonic() + seconds
        while not shown(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

    def close(self) -> None:
        try:
            self._call("Browser.close")
        except (RuntimeError, OSError):
            self._process.kill()
        self._process.wait(timeout=60)
        os.close(self._commands)
        os.close(self._answers)
