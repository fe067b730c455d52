"""`genfusion exp` (a profile's params as `dvc exp run -S` overrides) and `genfusion sweep` (AP50
against synthetic images over every experiment DVC knows)."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from genfusion import fsio
from genfusion.errors import GenfusionError
from genfusion.figures import synthetic_figure, synthetic_points
from genfusion.params import TEST_SET, profile_overrides


def exp_main(profile: Path, params_path: Path, *, name: str | None, queue: bool, dry_run: bool) -> int:
    """Run (or queue, or print) `dvc exp run` with the profile's params as overrides."""
    command = ["dvc", "exp", "run", *(["--queue"] if queue else []), *(["-n", name] if name else [])]
    for override in profile_overrides(profile, params_path):
        command += ["-S", override]
    return run_each([command], dry_run=dry_run)


def run_each(commands: Sequence[Sequence[str]], *, dry_run: bool) -> int:
    """Run the commands in turn and return the exit status of the first that fails (0 when none
    does); or, with `dry_run`, print them."""
    for command in commands:
        if dry_run:
            print(shlex.join(command))
            continue
        done = subprocess.run(command)
        if done.returncode:
            return done.returncode
    return 0


def exp_show(what: str, *, all_commits: bool = False) -> object:
    """`dvc exp show --json` output, for the command `what`."""
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise GenfusionError(f"{what}: `{shlex.join(command)}` failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def revisions(shown: object) -> Iterator[dict]:
    """Every revision in `dvc exp show --json` output (workspace, commits and their experiments),
    with its params (params.yaml) and the summary (metrics/summary.json) as `params` and `summary`
    (empty when it has none)."""
    if isinstance(shown, dict):
        data = shown.get("data")
        if "rev" in shown and isinstance(data, dict):
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            summary = ((data.get("metrics") or {}).get("metrics/summary.json") or {}).get("data") or {}
            yield shown | {"params": params, "summary": summary}
        for value in shown.values():
            yield from revisions(value)
    elif isinstance(shown, list):
        for value in shown:
            yield from revisions(value)


# An experiment's executor state while queued, running or failed; a finished one has none left
# or "success". Until it succeeds its files, metrics included, are its baseline commit's.
FINISHED = (None, "success")


def experiments(shown: object, states: Sequence[str | None] = FINISHED) -> Iterator[dict]:
    """The experiments in `dvc exp show --json` output whose executor state is one of `states`
    (by default the finished ones), each as `revisions` gives it. One whose files DVC could not
    read at that moment (a running one, while it commits) has no `data`: empty params and summary."""
    for baseline in shown if isinstance(shown, list) else []:
        for experiment in baseline.get("experiments") or []:
            if (experiment.get("executor") or {}).get("state") in states:
                rev = experiment["revs"][0]
                yield next(revisions(rev), None) or rev | {"params": {}, "summary": {}}


def experiment_summaries(shown: object) -> list[dict]:
    """The test-scene table of every `metrics/summary.json` in `dvc exp show --json` output.
    Summaries written before scenes were scored whole have no `test` table and are left out:
    their tile-level AP is not comparable."""
    baselines = [next(revisions(baseline)) for baseline in shown] if isinstance(shown, list) else []
    return [
        rev["summary"][TEST_SET] for rev in [*baselines, *experiments(shown)] if TEST_SET in rev["summary"]
    ]


def sweep_main(out: Path) -> None:
    """`reports/sweep.png`: AP50 against synthetic images over every experiment DVC knows."""
    summaries = experiment_summaries(exp_show("sweep"))
    points = [point for summary in summaries for point in synthetic_points(summary)]
    if not points:
        raise GenfusionError("sweep: no experiment has metrics/summary.json yet; run `dvc exp run` first")
    fsio.write_png(out, synthetic_figure(sorted(set(points))))
