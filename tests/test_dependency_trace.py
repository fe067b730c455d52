"""The tracer behind test_dvc_declarations: which params keys, pipeline paths and modules it records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dependency_trace import Trace, main, recording

from genfusion import fsio
from genfusion.params import Params, Section, TrainParams, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_recording_names_each_params_key_read_after_loading(tmp_path: Path) -> None:
    with recording(Trace(tmp_path)) as trace:
        params = load_params(ROOT / "params.yaml")
        assert params.train.batch
        params.train.model_dump(exclude={"variants", "seeds"})
        assert list(params.subjects) == ["canopy"]
        assert params.finetune_for("canopy").steps
        assert params.subject("canopy").instance_prompt
        # A section built in code is no params key.
        assert TrainParams().epochs
    dumped = {f"train.{name}" for name in TrainParams.model_fields} - {"train.variants", "train.seeds"}
    # Loading validates the whole file (classes, task, every section): no key is counted for it.
    assert trace.params == dumped | {
        "finetune.steps",
        "subjects.canopy.finetune",
        # subject() fills the missing class prompt in from diffusion.class_prompt.
        "subjects.canopy.class_prompt",
        "diffusion.class_prompt",
        "subjects.canopy.instance_prompt",
    }
    assert trace.param_names == {"subjects"}
    assert "__getattribute__" not in Section.__dict__ and "subject" in Params.__dict__


def test_recording_names_pipeline_paths_by_their_final_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data" / "real").mkdir(parents=True)
    (tmp_path / "data" / "real" / "a.txt").write_text("a")
    (tmp_path / "params.yaml").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with recording(Trace(tmp_path)) as trace:
        Path("data/real/a.txt").read_text()
        list(Path("data/real").iterdir())
        Path("params.yaml").read_text()
        fsio.write_json(Path("models/base/config.json"), {})
        with fsio.replace_dir(Path("data/out")) as scratch:
            (scratch / "b.txt").write_text("b")
    Path("data/real/a.txt").read_text()
    assert trace.paths == {"data/real/a.txt", "data/real", "models/base/config.json", "data/out/b.txt"}


def test_main_runs_the_command_and_writes_its_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", sys.argv)
    out = tmp_path / "trace.json"
    assert main([str(out), "--", "genfusion", "params"]) == 0
    trace = json.loads(out.read_text())
    # `genfusion params` prints the whole file: every section is read.
    assert trace["params"] == sorted(Params.model_fields)
    assert "src/genfusion/cli.py" in trace["modules"]
    with pytest.raises(SystemExit, match="usage"):
        main([str(out), "genfusion", "params"])
