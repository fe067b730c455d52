"""The process-wide state a test can change without meaning to, and a way to put it back."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def process_state_kept() -> Iterator[None]:
    """Put back, on the way out, what YOLO training, the command line (`use_threads`) and
    Ultralytics' device selection change for the whole process: torch's thread count and
    deterministic settings, the torch, numpy and `random` generators, the environment, the
    working folder. Without it a test computes differently after another one, so its result
    depends on the order the tests run in."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic
    fill = torch.utils.deterministic.fill_uninitialized_memory
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    environ = dict(os.environ)
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.deterministic = cudnn
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
