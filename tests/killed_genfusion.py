"""`genfusion ARGS...` that kills its own process (SIGKILL) at a moment known in advance:

    python killed_genfusion.py callback EVENT EPOCH ARGS...
        at Ultralytics' callback EVENT of training epoch EPOCH (0-based), before the stage's own
        callbacks of that event run;
    python killed_genfusion.py after MODULE.FUNCTION N ARGS...
        as soon as the Nth call of MODULE.FUNCTION (`genfusion.fsio.write_png`) has returned.

A real kill, so nothing after it runs (no `finally`, no cleanup), at a state the test knows: a
kill timed from outside, by polling one file, can land before or after any of the stage's other
writes, and on a loaded machine later than planned."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path


def command(how: str, where: str, when: int) -> list[str]:
    """The command line that runs this script: `[*command(...), *genfusion_arguments]`."""
    return [sys.executable, str(Path(__file__)), how, where, str(when)]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_callback(event: str, epoch: int) -> None:
    from genfusion.integrations.ultralytics import configure_offline

    configure_offline()
    from ultralytics.utils import callbacks

    def kill(trainer) -> None:
        if trainer.epoch == epoch:
            die()

    # Every model copies the default callbacks when it is made; the stage adds its own after them.
    callbacks.default_callbacks[event].insert(0, kill)


def kill_after_calls(target: str, calls: int) -> None:
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    function = getattr(module, name)
    count = 0

    def counted(*args, **kwargs):
        nonlocal count
        result = function(*args, **kwargs)
        count += 1
        if count == calls:
            die()
        return result

    setattr(module, name, counted)


def main() -> None:
    how, where, when, *arguments = sys.argv[1:]
    {"callback": kill_at_callback, "after": kill_after_calls}[how](where, int(when))
    from genfusion.cli import main as genfusion

    sys.argv = ["genfusion", *arguments]
    genfusion()


if __name__ == "__main__":
    main()
