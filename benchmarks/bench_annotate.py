"""Label Studio round trip, measured: push and pull of N tasks against a local server.

Run from the project root (installs Label Studio into .labelstudio/venv on first use):
    .venv/bin/python benchmarks/bench_annotate.py [--tasks 1000]
Makes N small images with two automatic boxes each, starts a server on a free loopback port
with a scratch database, then times:
- client: the Label Studio SDK's import and set-up (once per `genfusion annotate` command);
- push: `annotate.push` through the SDK (project, storage, de-duplication, one task per image
  with its prediction) against a bare import of the same task JSON with `requests`;
- pull: `annotate.pull` through the SDK (export, conversion, atomic write) after an annotator
  finished every task, against a bare export request with `requests`.
Prints seconds and tasks per second for each, and the ratio ours / bare (time).
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def main() -> None:
    import requests
    from PIL import Image

    from genfusion.boxes import Box
    from genfusion.commands import annotate
    from genfusion.formats import label_studio as ls_format
    from genfusion.integrations import label_studio as ls
    from genfusion.stages import prelabel

    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    n, size, classes = args.tasks, (64, 48), ["tree"]
    exe = ls.server_executable(ROOT / ".labelstudio")
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as scratch:
        root = Path(scratch)
        images = root / "generated" / "canopy" / "images"
        images.mkdir(parents=True)
        stems = [f"canopy_{k:05d}" for k in range(n)]
        for k, stem in enumerate(stems):
            Image.new("RGB", size, (k % 256, 120, 40)).save(images / f"{stem}.png")
        boxes = (Box("tree", 4, 6, 20, 22), Box("tree", 30, 10, 50, 30))
        found = [prelabel.Labels(boxes, (0.8, 0.4))] * n
        prelabel.write_labels(root / "prelabels" / "canopy", stems, found, [size] * n, classes, "detector")
        token, port = secrets.token_hex(20), free_port()
        account = {ls.USER_VAR: "bench@example.org", ls.PASSWORD_VAR: secrets.token_hex(8)}
        env = ls.server_env(root / "home", root, account | {ls.TOKEN_VAR: token})
        server_process = ls.start_server(exe, port, env, root / "label-studio.log")
        try:
            url = f"http://127.0.0.1:{port}"
            # The client: the SDK's import and set-up, once per command.
            client_s, server = timed(lambda: ls.LabelStudio(url, token))
            bare = requests.Session()
            bare.headers["Authorization"] = f"Token {token}"
            args_push = (server, "bench ours", "canopy", root / "generated/canopy", root / "prelabels/canopy")
            push_s, summary = timed(lambda: annotate.push(*args_push, classes, "detect", root))
            project = summary["project"]
            assert len(server.task_keys(project)) == n
            # Bare: the same task JSON, built beforehand, imported into a fresh project.
            prediction = ls_format.Prediction(boxes, (0.8, 0.4), "detector")
            bare_tasks = [
                ls_format.task_json(
                    f"canopy/{s}.png",
                    f"/data/local-files/?d=generated/canopy/images/{s}.png",
                    size,
                    "detect",
                    prediction,
                )
                for s in stems
            ]
            bare_project = server.ensure_project("bench bare", ls_format.label_config(classes, "detect"))
            bare_push_s, _ = timed(
                lambda: bare.post(
                    f"{url}/api/projects/{bare_project}/import", json=bare_tasks
                ).raise_for_status()
            )

            # An annotator accepts every prediction as it is.
            for task in server.sdk.tasks.list(project=project, page_size=n, fields="all"):
                server.sdk.annotations.create(task.id, result=task.predictions[0].result)
            pull_s, pulled = timed(
                lambda: annotate.pull(
                    server, "bench ours", root / "generated/canopy", root / "out", classes, "detect"
                )
            )
            assert pulled["annotated"] == n, pulled
            params = {"exportType": "JSON", "download_all_tasks": "true"}
            bare_pull_s, _ = timed(
                lambda: bare.get(f"{url}/api/projects/{project}/export", params=params, timeout=600).json()
            )
        finally:
            ls.stop_server(server_process)
    print(
        f"tasks: {n}  (Label Studio {ls.LABEL_STUDIO}, {ls.LABEL_STUDIO_SDK}, local server, {sys.platform})"
    )
    print(f"client: SDK import and set-up {client_s:.1f} s, once per command")
    for name, ours, bare, what in (
        ("push", push_s, bare_push_s, "import"),
        ("pull", pull_s, bare_pull_s, "export"),
    ):
        print(
            f"{name}: ours {ours:.1f} s ({n / ours:.0f} tasks/s), bare {what} {bare:.1f} s;"
            f" ratio {ours / bare:.2f}"
        )


if __name__ == "__main__":
    main()
