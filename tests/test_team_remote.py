"""A team's workflow through an S3 remote: one clone pushes the tiny pipeline's data, models and
an experiment; a second clone pulls them, sees the same metrics, and a registered detector is
fetched by name. The S3 API is moto's server on loopback, the one DVC's own S3 tests use, and the
git remote is a bare repository; credentials are only ever in the environment."""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from project import commit, run
from tiny_pipeline import BUILT

from genfusion.commands.experiments import experiments

pytestmark = pytest.mark.integration

BUCKET = "genfusion-team"
# What a CI secret store would put in the environment (moto accepts any pair); made at run time,
# so that finding it in a file means the run wrote it there.
SECRET = secrets.token_hex(16)
EXPERIMENT = "fewer-resamples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 API on loopback with the team's bucket in it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="team",
            aws_secret_access_key=SECRET,
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def credentials(tmp_path: Path) -> dict[str, str]:
    """The environment of a team member's shell: S3 keys, and no AWS files from the home folder."""
    return {
        "AWS_ACCESS_KEY_ID": "team",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }


def shown_experiment(repo: Path, name: str) -> tuple[dict, dict]:
    """The params (params.yaml) and metrics (by file) of experiment `name` in `dvc exp show`."""
    for rev in experiments(json.loads(run(repo, "dvc", "exp", "show", "--json"))):
        if rev["name"] == name:
            return rev["params"], {path: entry["data"] for path, entry in rev["data"]["metrics"].items()}
    raise AssertionError(f"no experiment {name} in {repo}'s dvc exp show")


def test_a_second_clone_pulls_the_data_models_and_experiment_a_first_pushed(
    tiny_project: Path, s3_endpoint: str, credentials: dict[str, str], tmp_path: Path
) -> None:
    alice = tiny_project
    origin = tmp_path / "team.git"
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    run(alice, "git", "remote", "add", "origin", str(origin))
    # The team's DVC remote, committed: the URL and endpoint are shared, the keys are not.
    run(alice, "dvc", "remote", "add", "-d", "team", f"s3://{BUCKET}/cache")
    run(alice, "dvc", "remote", "modify", "team", "endpointurl", s3_endpoint)
    commit(alice, "the team's remote")
    run(alice, "git", "push", "-q", "origin", "main")
    run(alice, "dvc", "push", "-q", env=credentials)

    run(alice, "dvc", "exp", "run", "-q", "-S", "evaluate.bootstrap=100", "-n", EXPERIMENT)
    run(alice, "dvc", "exp", "push", "origin", EXPERIMENT, env=credentials)
    register = ["-m", "Registering detector-composite-0 version 1.0.0"]
    run(alice, "git", "tag", "-a", "detector-composite-0@v1.0.0", *register)
    run(alice, "git", "push", "-q", "origin", "--tags")

    bob = tmp_path / "bob"
    run(tmp_path, "git", "clone", "-q", str(origin), str(bob))
    run(bob, "dvc", "pull", "-q", env=credentials)
    # The datasets' link farms are in neither remote (.gitignore): `dvc repro` rebuilds them from
    # the pulled images, to the hashes dvc.lock names, so nothing downstream of them runs.
    rebuilt = re.findall(r"Running stage '([^']+)'", run(bob, "dvc", "repro"))
    assert sorted(rebuilt) == sorted(["real_dataset", *(f"datasets@{v}" for v in BUILT)])
    assert json.loads(run(bob, "dvc", "status", "--json")) == {}
    weights = "models/detectors/composite-0/weights/best.pt"
    assert (bob / weights).read_bytes() == (alice / weights).read_bytes()

    run(bob, "dvc", "exp", "pull", "origin", EXPERIMENT, env=credentials)
    params, metrics = shown_experiment(bob, EXPERIMENT)
    assert params["evaluate"]["bootstrap"] == 100
    assert "metrics/summary.json" in metrics
    assert (params, metrics) == shown_experiment(alice, EXPERIMENT)

    fetched = tmp_path / "composite.pt"
    get = ["dvc", "artifacts", "get", str(origin), "detector-composite-0", "-o", str(fetched)]
    run(tmp_path, *get, env=credentials)
    assert fetched.read_bytes() == (alice / weights).read_bytes()

    # The keys were never written down: not in either clone's DVC or git config, nor in git.
    for repo in (alice, bob):
        for config in (".dvc/config", ".dvc/config.local", ".git/config"):
            if (repo / config).is_file():
                assert SECRET not in (repo / config).read_text(), f"{repo / config} holds the secret"
    assert SECRET not in run(alice, "git", "log", "-p", "--all")
