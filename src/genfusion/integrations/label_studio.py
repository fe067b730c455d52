"""Label Studio: the server (installed in its own venv, on 127.0.0.1, with no outside calls) and
the client of its API, with errors that say what to do.

The client is the Label Studio SDK (`label-studio-sdk`), imported only when a command talks to
a server. `make setup` installs it without its OpenCV pin (requirements/label-studio-sdk.txt
says why), and the server, whose pins clash with this project's, runs from its own venv. The
API token comes from the environment or a git-ignored `.env`, never from params or logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genfusion.errors import GenfusionError
from genfusion.formats.label_studio import KEY
from genfusion.params import AnnotateParams

log = logging.getLogger(__name__)

LABEL_STUDIO = "label-studio==1.23.2"
LABEL_STUDIO_SDK = "label-studio-sdk==2.1.2"
# Environment (or .env) variables: the server's address and token, and the account `serve` creates.
URL_VAR, TOKEN_VAR = "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"
USER_VAR, PASSWORD_VAR = "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD"
# Requests that change the server are sent once: the SDK would otherwise retry them after a
# server error or a dropped connection, and an import the server did carry out would be doubled.
ONCE = {"max_retries": 0}
# Seconds a request may take (an export of a large project); the SDK's default is 60.
TIMEOUT = 600


def credentials(env_file: Path = Path(".env")) -> dict[str, str]:
    """LABEL_STUDIO_* settings: the environment first, then the git-ignored `.env`."""
    from dotenv import dotenv_values

    found = {k: v for k, v in dotenv_values(env_file).items() if v} if env_file.is_file() else {}
    names = (URL_VAR, TOKEN_VAR, USER_VAR, PASSWORD_VAR)
    return {name: os.environ.get(name) or found.get(name, "") for name in names}


class LabelStudio:
    """The calls this tool makes, through the Label Studio SDK (`self.sdk`, a
    `label_studio_sdk.LabelStudio`), with errors that say what to do."""

    def __init__(self, url: str, token: str) -> None:
        if not token:
            raise GenfusionError(
                f"no Label Studio API token: set {TOKEN_VAR} in the environment or in .env"
                " (the token `genfusion annotate serve` was started with, or yours from the"
                " server's Account & Settings page)"
            )
        try:
            from label_studio_sdk import LabelStudio as Client
        except ImportError as exc:
            raise GenfusionError(
                f"the Label Studio SDK is not installed ({exc}): run `make setup`, or"
                f" `pip install -r requirements/label-studio-sdk.txt` then"
                f" `pip install --no-deps {LABEL_STUDIO_SDK}`"
            ) from exc
        self.url = url.rstrip("/")
        # Legacy tokens and personal access tokens (JWT) alike; an expired JWT is refused here.
        with self.answers("connect"):
            self.sdk = Client(base_url=self.url, api_key=token, timeout=TIMEOUT)

    @contextlib.contextmanager
    def answers(self, what: str) -> Iterator[None]:
        """The SDK's errors while doing `what`, as errors that say what to do."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise GenfusionError(
                f"cannot reach Label Studio at {self.url}: start it with `genfusion annotate serve`,"
                f" or set {URL_VAR} (or annotate.url) to your team's server"
            ) from exc
        except ApiError as exc:
            if exc.status_code in (401, 403):
                raise GenfusionError(
                    f"Label Studio at {self.url} refused the API token ({TOKEN_VAR}): HTTP"
                    f" {exc.status_code}; check the token on the server's Account & Settings page"
                ) from exc
            raise GenfusionError(
                f"Label Studio at {self.url}: {what} failed: HTTP {exc.status_code} {str(exc.body)[:300]}"
            ) from exc

    def project(self, title: str) -> int | None:
        with self.answers(f"finding project {title!r}"):
            # `title` filters by "contains"; the oldest project of exactly that title is the one.
            ids = [p.id for p in self.sdk.projects.list(title=title, page_size=1000) if p.title == title]
        return min(ids) if ids else None

    def ensure_project(self, title: str, config: str) -> int:
        project = self.project(title)
        if project is None:
            with self.answers(f"creating project {title!r}"):
                return self.sdk.projects.create(title=title, label_config=config, request_options=ONCE).id
        with self.answers(f"updating the labelling config of project {title!r}"):
            self.sdk.projects.update(project, label_config=config)
        return project

    def ensure_storage(self, project: int, folder: str) -> None:
        """Local-file storage for `folder`: it lets the server serve the images there. Never
        synced: a sync would add a task per image file, without the key that push relies on."""
        with self.answers(f"setting up local-file storage for project {project}"):
            if not any(s.path == folder for s in self.sdk.import_storage.local.list(project=project)):
                self.sdk.import_storage.local.create(
                    project=project, path=folder, use_blob_urls=False, title="genfusion", request_options=ONCE
                )

    def task_keys(self, project: int) -> set[str]:
        with self.answers(f"listing the tasks of project {project}"):
            tasks = self.sdk.tasks.list(project=project, fields="task_only", page_size=1000)
            return {(task.data or {}).get(KEY) for task in tasks}

    def import_tasks(self, project: int, tasks: list[dict]) -> None:
        # One request per thousand tasks keeps each request well under the server's size limits.
        for start in range(0, len(tasks), 1000):
            with self.answers(f"importing tasks into project {project}"):
                self.sdk.projects.import_tasks(
                    project, request=tasks[start : start + 1000], request_options=ONCE
                )

    def export(self, project: int) -> list[Any]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""
        with self.answers(f"exporting project {project}"):
            return self.sdk.projects.exports.as_json(project, timeout=TIMEOUT)


def client(settings: AnnotateParams, env_file: Path = Path(".env")) -> LabelStudio:
    found = credentials(env_file)
    return LabelStudio(found[URL_VAR] or settings.url, found[TOKEN_VAR])


def installed_server(home: Path) -> Path:
    """Where Label Studio's executable is once installed under `home` (it may not be yet)."""
    return home / "venv" / "bin" / "label-studio"


def server_executable(home: Path) -> Path:
    """Label Studio in its own venv under `home`, installed on first use."""
    venv = home / "venv"
    exe = installed_server(home)
    if exe.is_file():
        return exe
    log.info("installing %s into %s (once; a minute or two)", LABEL_STUDIO, venv)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", LABEL_STUDIO], check=True)
    except subprocess.CalledProcessError as exc:
        raise GenfusionError(
            f"could not install {LABEL_STUDIO} into {venv}: {exc}; check that PyPI is reachable,"
            f" then delete {venv} and try again"
        ) from exc
    return exe


def server_env(home: Path, document_root: Path, found: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: its own data folder, local files under the project, the
    account from the credentials, nothing sent anywhere."""
    missing = [name for name in (USER_VAR, PASSWORD_VAR, TOKEN_VAR) if not found.get(name)]
    if missing:
        raise GenfusionError(
            f"set {', '.join(missing)} in the environment or in .env (git-ignored): the account and"
            " API token the local Label Studio is started with"
        )
    return os.environ | {
        "LABEL_STUDIO_BASE_DATA_DIR": str((home / "data").resolve()),
        "HOME": str(home.resolve()),
        USER_VAR: found[USER_VAR],
        PASSWORD_VAR: found[PASSWORD_VAR],
        "LABEL_STUDIO_USER_TOKEN": found[TOKEN_VAR],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root.resolve()),
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }


def server_command(exe: Path, port: int) -> list[str]:
    return [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]


def start_server(exe: Path, port: int, env: Mapping[str, str], log_file: Path, timeout: float = 300):
    """Start Label Studio in the background (its own process group, output to `log_file`) and
    wait for it to answer; the running process back. For tests and benchmarks."""
    import requests

    check_port_free(port)
    with log_file.open("w") as out:
        server = subprocess.Popen(
            server_command(exe, port),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise GenfusionError(
                f"Label Studio exited at start; its log, {log_file}:\n{log_file.read_text()[-3000:]}"
            )
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise GenfusionError(f"Label Studio did not answer within {timeout:.0f} s; see {log_file}")
        time.sleep(1)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def check_port_free(port: int) -> None:
    # Label Studio silently moves to another port when its own is taken; say so instead.
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise GenfusionError(f"port {port} on 127.0.0.1 is in use; stop what runs there or choose --port")


def url_port(url: str) -> int:
    return urlsplit(url).port or 8080


# --- entry points --------------------------------------------------------------------------
