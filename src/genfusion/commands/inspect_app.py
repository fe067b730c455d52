"""`genfusion inspect app`: the FiftyOne App with the inspect stage's dataset and saved views."""

from __future__ import annotations

from pathlib import Path

from genfusion.errors import GenfusionError
from genfusion.integrations.fiftyone import connect, follow_project_move, use_database
from genfusion.layout import project_root
from genfusion.params import Params


def main(params: Params, *, port: int | None, host: str) -> None:
    """Serve the FiftyOne App on 127.0.0.1 with the stage's dataset until Ctrl-C."""
    import socket

    settings = params.inspect
    use_database(Path(settings.database_dir))
    connect()
    import fiftyone as fo

    if settings.dataset not in fo.list_datasets():
        raise GenfusionError(f"no FiftyOne dataset {settings.dataset!r} yet; run `dvc repro inspect` first")
    port = port or settings.app_port
    dataset = fo.load_dataset(settings.dataset)
    follow_project_move(dataset, project_root())
    session = fo.launch_app(dataset, remote=True, address=host, port=port)
    machine = socket.gethostname()
    print(f"FiftyOne App: http://{host}:{port} (saved views: {', '.join(dataset.list_saved_views())})")
    print(
        f"from another machine: ssh -N -L {port}:127.0.0.1:{port} {machine}, then open http://127.0.0.1:{port}"
    )
    session.wait(-1)
