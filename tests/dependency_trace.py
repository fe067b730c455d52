"""Record what a `genfusion` command reads, to compare it with what dvc.yaml declares for its stage.

    python -m dependency_trace OUT.json -- genfusion COMMAND [ARGS...]

runs the command in this process (tests/ and the project's src/ on PYTHONPATH) and writes OUT.json:
- "params": dotted params.yaml keys whose values it read (`train.batch`, and each field of a
  section it dumped with model_dump);
- "param_names": keys whose set of names it read (`subjects` when it iterated the subjects);
- "paths": files and folders it opened (to read or write) or listed under data/ and models/,
  relative to the current folder, the project root;
- "modules": the genfusion module files it imported, relative to the project root.

Params are recorded where code reads a field of the object `load_params` returned, or of a section
reached from it; reads made while validating the file are not counted, since they decide no
output. Files are recorded through Python's audit events, so opens inside C extensions
(safetensors, OpenCV) and in child processes are not seen: a file read only that way, from a folder
nothing else lists or opens, escapes the check.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from genfusion.params import Params, Section

# Where the pipeline's data and models live. Not metrics/ and reports/: what stages read there
# is few files, declared, and dvclive lists its own folder, the parent of two outs, at start.
# src/ and params.yaml are checked as modules and params keys.
TRACED_DIRS = ("data", "models")
# Stages write an output under a hidden scratch name beside it and rename it into place
# (genfusion.fsio: `.NAME.tmp` folders, `.NAME.<random>.tmp` files, `.NAME.old`; train:
# `.NAME.partial`): a scratch path stands for the output it becomes.
SCRATCH = re.compile(r"\.(?P<name>.+?)\.(?:\w{8}\.tmp|tmp|old|partial)")
FILE_EVENTS = ("open", "os.listdir", "os.scandir")


class Trace:
    """What one command read: params keys, pipeline paths, and (set at the end) genfusion modules."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())
        self.params: set[str] = set()
        self.param_names: set[str] = set()
        self.paths: set[str] = set()
        self.modules: list[str] = []
        # id(section) -> (section, its dotted key); the object is kept so that its id is not reused.
        self._keys: dict[int, tuple[Section, str]] = {}
        self._paused = 0

    def register(self, section: Section, key: str) -> None:
        self._keys[id(section)] = (section, key)

    def key_of(self, section: Section) -> str | None:
        """The dotted key of a section read from the loaded params; None for any other object."""
        entry = self._keys.get(id(section))
        return entry[1] if entry is not None and entry[0] is section and not self._paused else None

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def read_field(self, section: Section, name: str, value: Any) -> None:
        """Record `section.name`: a sub-section is only registered, since reading it decides
        nothing until one of its fields is read; a mapping of sections (`subjects`) gives its names."""
        key = self.key_of(section)
        if key is None:
            return
        key = dotted(key, name)
        if isinstance(value, Section):
            self.register(value, key)
        elif isinstance(value, dict) and value and all(isinstance(v, Section) for v in value.values()):
            for entry, child in value.items():
                self.register(child, f"{key}.{entry}")
            self.param_names.add(key)
        else:
            self.params.add(key)

    def read_path(self, event: str, args: tuple) -> None:
        if event in FILE_EVENTS and args and isinstance(args[0], str | bytes | os.PathLike):
            relative = pipeline_path(self.root, os.fsdecode(args[0]))
            if relative is not None:
                self.paths.add(relative)

    def as_json(self) -> dict[str, list[str]]:
        return {
            "params": sorted(self.params),
            "param_names": sorted(self.param_names),
            "paths": sorted(self.paths),
            "modules": self.modules,
        }


def dotted(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def dumped_fields(section: type[Section], include: Any = None, exclude: Any = None) -> list[str]:
    """The fields `model_dump(include=..., exclude=...)` writes out (top-level names)."""
    return [
        name
        for name in section.model_fields
        if (include is None or name in include) and (exclude is None or name not in exclude)
    ]


def pipeline_path(root: str, path: str) -> str | None:
    """`path` relative to `root` with scratch names replaced, when it is under a traced folder."""
    parts = os.path.relpath(os.path.abspath(path), root).split(os.sep)
    if parts[0] not in TRACED_DIRS:
        return None
    return "/".join(m["name"] if (m := SCRATCH.fullmatch(part)) else part for part in parts)


def genfusion_modules(root: Path) -> list[str]:
    """The genfusion module files loaded so far, relative to `root`."""
    files = {
        getattr(module, "__file__", None)
        for name, module in list(sys.modules.items())
        if name == "genfusion" or name.startswith("genfusion.")
    }
    return sorted(Path(os.path.relpath(f, root)).as_posix() for f in files if f)


_current: Trace | None = None


def _audit(event: str, args: tuple) -> None:
    # An audit hook cannot be removed: it forwards to the trace being recorded, if any.
    if _current is not None:
        _current.read_path(event, args)


@contextmanager
def _patched(owner: type, name: str, replacement: Any) -> Iterator[None]:
    """Set `owner.name`, then restore it (or remove it, when `owner` only inherited it)."""
    own = owner.__dict__.get(name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own is None:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


def _traced_getattribute(trace: Trace, original: Callable) -> Callable:
    def getattribute(section: Section, name: str) -> Any:
        value = original(section, name)
        if name in type(section).model_fields:
            trace.read_field(section, name, value)
        return value

    return getattribute


def _traced_model_dump(trace: Trace, original: Callable) -> Callable:
    def model_dump(section: Section, **options: Any) -> dict[str, Any]:
        key = trace.key_of(section)
        if key is not None:
            fields = dumped_fields(type(section), options.get("include"), options.get("exclude"))
            trace.params.update(dotted(key, name) for name in fields)
        return original(section, **options)

    return model_dump


def _traced_model_validate(trace: Trace, original: Callable) -> classmethod:
    def model_validate(cls: type[Params], *args: Any, **kwargs: Any) -> Params:
        params = original(cls, *args, **kwargs)
        trace.register(params, "")
        return params

    return classmethod(model_validate)


def _traced_subject(trace: Trace, original: Callable) -> Callable:
    # The subject may come back as a copy (its class prompt filled in); its fields are still
    # subjects.<name>.*.
    def subject(params: Params, name: str) -> Section:
        chosen = original(params, name)
        if trace.key_of(params) is not None:
            trace.register(chosen, f"subjects.{name}")
        return chosen

    return subject


def _traced_finetune_for(trace: Trace, original: Callable) -> Callable:
    # The merged copy reads like `finetune`: a field read from it is that `finetune` key, plus the
    # subject's overrides, which may replace any of them. Dumping `finetune` to merge it is no read
    # of every key: only the fields used later decide an output.
    def finetune_for(params: Params, name: str) -> Section:
        if trace.key_of(params) is None:
            return original(params, name)
        with trace.paused():
            merged = original(params, name)
        trace.params.add(f"subjects.{name}.finetune")
        trace.register(merged, "finetune")
        return merged

    return finetune_for


_installed_hook = False


@contextmanager
def recording(trace: Trace) -> Iterator[Trace]:
    """Record into `trace` what the code run inside the block reads."""
    global _current, _installed_hook
    if not _installed_hook:
        sys.addaudithook(_audit)
        _installed_hook = True
    patches = (
        (Section, "__getattribute__", _traced_getattribute(trace, Section.__getattribute__)),
        (Section, "model_dump", _traced_model_dump(trace, Section.model_dump)),
        (Params, "model_validate", _traced_model_validate(trace, Params.model_validate.__func__)),
        (Params, "subject", _traced_subject(trace, Params.subject)),
        (Params, "finetune_for", _traced_finetune_for(trace, Params.finetune_for)),
    )
    with ExitStack() as restore:
        for owner, name, replacement in patches:
            restore.enter_context(_patched(owner, name, replacement))
        _current = trace
        try:
            yield trace
        finally:
            _current = None


def main(argv: list[str]) -> int | str | None:
    """Run the command under `recording` and write its trace; the command's exit status."""
    if len(argv) < 3 or argv[1] != "--" or argv[2] != "genfusion":
        sys.exit("usage: python -m dependency_trace OUT.json -- genfusion COMMAND [ARGS...]")
    from genfusion.cli import main as genfusion_main

    out, command = Path(argv[0]), argv[2:]
    sys.argv = command
    with recording(Trace(Path.cwd())) as trace:
        try:
            genfusion_main()
            status = None
        except SystemExit as exc:
            status = exc.code
    trace.modules = genfusion_modules(Path.cwd())
    out.write_text(json.dumps(trace.as_json(), indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
