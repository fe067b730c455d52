"""The command line is thin: dvc.yaml passes every stage its folders, so a stage's command has
no folder of its own to fall out of step with dvc.yaml; the commands outside a stage read theirs
from dvc.yaml's `vars: paths`."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import typer
import yaml

from genfusion.cli import app
from genfusion.commands.pipeline_paths import pipeline_path
from genfusion.errors import GenfusionError

ROOT = Path(__file__).resolve().parents[1]


def stage_commands() -> set[tuple[str, ...]]:
    """The `genfusion` sub-commands dvc.yaml's stages run, e.g. ("inspect", "build")."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    found = set()
    for spec in pipeline["stages"].values():
        words = shlex.split(spec.get("do", spec).get("cmd"))
        assert words[0] == "genfusion", words
        group = words[1:3] if words[1] in ("inspect", "annotate", "cross-scene") else words[1:2]
        found.add(tuple(group))
    return found


def command(names: tuple[str, ...]) -> click.Command:
    found = typer.main.get_command(app)
    for name in names:
        found = found.commands[name]
    return found


def test_stage_commands_take_their_folders_from_dvc_yaml_only() -> None:
    commands = stage_commands()
    assert {("seeds",), ("train",), ("inspect", "build"), ("datasets",)} <= commands
    defaults = [
        f"genfusion {' '.join(names)} {option.opts[0]} defaults to {option.default}"
        for names in sorted(commands)
        for option in command(names).params
        if option.param_type_name == "option" and option.name != "params_path"
        if isinstance(option.default, Path | str)
    ]
    assert defaults == []


def test_every_stage_command_parses() -> None:
    """Each command dvc.yaml runs, its vars and matrices resolved by DVC, gives every option its
    command requires and no option it lacks."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        commands = [stage.cmd for stage in repo.index.stages if getattr(stage, "cmd", None)]
    assert len(commands) > 20
    # Typer parses with its own copy of click: its usage errors are those typer.BadParameter is.
    usage_error = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
    refused = []
    for line in commands:
        words = shlex.split(line)[1:]
        found = typer.main.get_command(app)
        while isinstance(found, typer.core.TyperGroup):
            found = found.commands[words.pop(0)]
        try:
            found.make_context(found.name, words)
        except usage_error as exc:
            refused.append(f"{line}: {exc.format_message()}")
    assert refused == []


def test_commands_outside_a_stage_read_dvc_yaml_folders(tmp_path: Path) -> None:
    variables = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]
    assert pipeline_path("generated", ROOT / "dvc.yaml") == Path(variables[0]["paths"]["generated"])
    moved = tmp_path / "dvc.yaml"
    moved.write_text(
        yaml.safe_dump({"vars": [{"paths": {"generated": "elsewhere/generated"}}], "stages": {}})
    )
    assert pipeline_path("generated", moved) == Path("elsewhere/generated")
    with pytest.raises(GenfusionError, match=r"dvc.yaml: vars has no paths.prelabels; pass --prelabels"):
        pipeline_path("prelabels", moved)
    with pytest.raises(GenfusionError, match=r"cannot read the pipeline's folders .*; pass --scenes"):
        pipeline_path("scenes", tmp_path / "missing.yaml")
