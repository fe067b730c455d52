"""The layers of src/genfusion: a stage module never imports another stage, and no shared module
(formats, folder layout, job runner, integrations, the libraries the stages share) imports a
stage. What two stages share lives below both; only the command line and the commands, which
run stages, import them."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src/genfusion"
STAGES = "genfusion.stages"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str) -> set[str]:
    """Every module `source` (the text of `module`) imports, at any depth of the file, relative
    imports resolved; `from package import name` counts as importing `package.name` too."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def stage_imports(path: Path) -> set[str]:
    own = module_name(path)
    return {
        name
        for name in imported(path.read_text(encoding="utf-8"), own)
        if name.startswith(STAGES + ".") and name != own
    }


def test_the_import_reader_sees_absolute_relative_and_nested_imports() -> None:
    source = (
        "import genfusion.stages.seeds\n"
        "from genfusion.stages import report\n"
        "from .composite import plan\n"
        "def main():\n    from genfusion.stages.evaluate import model_name\n"
    )
    found = imported(source, "genfusion.stages.inpaint")
    assert {
        "genfusion.stages.seeds",
        "genfusion.stages.report",
        "genfusion.stages.composite",
        "genfusion.stages.evaluate",
    } <= found


def test_no_stage_imports_another_stage() -> None:
    stages = [path for path in sorted((SRC / "stages").glob("*.py")) if path.name != "__init__.py"]
    assert len(stages) > 10
    assert {path.name: stage_imports(path) for path in stages if stage_imports(path)} == {}


def test_no_shared_module_imports_a_stage() -> None:
    callers = {SRC / "cli.py", *SRC.joinpath("commands").rglob("*.py"), *SRC.joinpath("stages").rglob("*.py")}
    shared = [path for path in sorted(SRC.rglob("*.py")) if path not in callers]
    assert {"placement.py", "scene_detection.py", "boxes.py"} <= {path.name for path in shared}
    assert {str(path.relative_to(SRC)): stage_imports(path) for path in shared if stage_imports(path)} == {}
