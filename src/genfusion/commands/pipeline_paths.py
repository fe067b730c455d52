"""The pipeline's folders as dvc.yaml names them (`vars: paths`), for the commands that run
outside a stage (annotate push and pull, cross-scene report): dvc.yaml is the one place a folder
is written, and the stages get theirs on their command line."""

from __future__ import annotations

from pathlib import Path

import yaml

from genfusion.errors import GenfusionError

DVC_YAML = Path("dvc.yaml")


def pipeline_path(name: str, dvc_yaml: Path = DVC_YAML) -> Path:
    """The folder `paths.<name>` of dvc.yaml's vars."""
    try:
        pipeline = yaml.safe_load(dvc_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GenfusionError(
            f"{dvc_yaml}: cannot read the pipeline's folders ({exc}); pass --{name}"
        ) from exc
    variables = pipeline.get("vars", []) if isinstance(pipeline, dict) else []
    for entry in variables:
        if isinstance(entry, dict) and isinstance(entry.get("paths"), dict) and name in entry["paths"]:
            return Path(entry["paths"][name])
    raise GenfusionError(f"{dvc_yaml}: vars has no paths.{name}; pass --{name}")
