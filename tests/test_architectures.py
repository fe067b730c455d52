"""Every diffusion stage on the real architectures: scaled-down SD 1.x, SD 2.x and SDXL checkpoints
(tests/checkpoints.py) run base_model, class_images, finetune, generate with attention capture,
prelabel and variations, with the Genfusion profile's settings (bfloat16 weights and bf16 mixed
precision standing in for its float16 / fp16, which need a GPU); and the checkpoint mistakes a
user makes are refused with the param and the fix."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from checkpoints import ARCHITECTURES, RESOLUTION
from PIL import Image

from genfusion.errors import GenfusionError
from genfusion.formats import read_annotations
from genfusion.params import load_params
from genfusion.stages import base_model, class_images, finetune, generate, prelabel, variations
from genfusion.stages.seeds import run_seeds

TORCH_THREADS = 1  # this module's torch threads (conftest.module_state): a worker's one core of CI's two
ROOT = Path(__file__).resolve().parents[1]
# What each architecture fine-tunes: the profile's full UNet (with its gradient checkpointing) on
# SD 1.x and 2.x, LoRA on SDXL (as diffusers' SDXL DreamBooth example trains it).
METHODS = {"sd1": "full", "sd2": "full", "sdxl": "lora"}


def reset_accelerate() -> None:
    """Each stage is its own process in a real run; here they share one, so reset accelerate's
    process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_params(root: Path, architecture: str, **sections: dict) -> Path:
    """The Genfusion profile on `architecture` at its native resolution, with the CPU's stand-ins
    for what needs a GPU (bfloat16 / bf16 for float16 / fp16) and tiny counts."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = yaml.safe_load((ROOT / "profiles/genfusion.yaml").read_text())
    assert (profile["diffusion"]["dtype"], profile["finetune"]["mixed_precision"]) == ("float16", "fp16")
    params["diffusion"] = profile["diffusion"] | {
        "base": f"models/checkpoints/{architecture}",
        "device": "cpu",
        "resolution": RESOLUTION,
        "dtype": "bfloat16",
    }
    params["finetune"] = profile["finetune"] | {
        "method": METHODS[architecture],
        "mixed_precision": "bf16",
        "steps": 2,
        "num_class_images": 2,
    }
    params["generate"] = profile["generate"] | {"n": 2, "steps": 2, "batch": 2}
    params["subjects"]["canopy"]["select"] = {"pattern": "*_x0_y0*"}
    params["variations"] = {"per_image": 1, "steps": 2, "strength": 0.5, "batch": 4}
    params["prelabel"] = {"method": "attention", "min_box_area": 1}
    for section, values in sections.items():
        params[section] = params.get(section, {}) | values
    path = root / f"params-{architecture}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def project(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: the real tiles, and the three checkpoints in models/checkpoints/."""
    root = tmp_path_factory.mktemp("architectures")
    seeds = load_params(ROOT / "params.yaml").seeds.model_copy(update={"source": neon_seeds})
    run_seeds(read_annotations(neon_seeds), seeds, ["tree"], root / "data/real")
    for name, save in ARCHITECTURES.items():
        save(root / "models/checkpoints" / name)
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


@pytest.mark.integration
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_diffusion_stage_runs_on_the_architecture(
    project: Path, architecture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    params = load_params(write_params(project, architecture))
    out = Path("runs") / architecture
    base, real = out / "base", Path("data/real")

    base_model.main(params, real=real, out=base, checkpoints=Path("models/checkpoints"))
    source = json.loads((base / "source.json").read_text())
    assert source["base"] == f"models/checkpoints/{architecture}" and len(source["fingerprint"]) == 64

    reset_accelerate()
    class_images.main(params, subject="canopy", base=base, out=out / "class")
    reset_accelerate()
    finetune.main(
        params,
        subject="canopy",
        base=base,
        real=real,
        class_images=out / "class",
        out=out / "finetuned",
        live=out / "live",
    )
    record = json.loads((out / "finetuned" / "finetune.json").read_text())
    assert record["method"] == METHODS[architecture] and record["class_images"] == 2
    weights = {"lora": "pytorch_lora_weights.safetensors", "full": "unet"}[METHODS[architecture]]
    assert (out / "finetuned" / weights).exists()
    losses = rows(out / "live" / "plots" / "metrics" / "loss.tsv")
    assert len(losses) == 2 and all(np.isfinite(float(row["loss"])) for row in losses)

    reset_accelerate()
    generate.main(
        params, subject="canopy", base=base, finetuned=out / "finetuned", real=real, out=out / "gen"
    )
    manifest = rows(out / "gen" / "manifest.csv")
    assert len(manifest) == 2
    assert {(row["dtype"], row["device"]) for row in manifest} == {("bfloat16", "cpu")}
    for row in manifest:
        image = np.asarray(Image.open(out / "gen" / row["file"]))
        assert image.shape == (RESOLUTION, RESOLUTION, 3) and image.std() > 0
        with np.load(out / "gen" / "attention" / f"{Path(row['file']).stem}.npz") as maps:
            cross, self_attention = maps["cross"], maps["self"]
        side = cross.shape[-1]
        assert cross.shape == (1, side, side) and self_attention.shape == (side * side,) * 2
        assert np.isfinite(cross.astype(np.float32)).all()

    prelabel.main(
        params, subject="canopy", generated=out / "gen", weights=Path("none.pt"), out=out / "labels"
    )
    assert len(list((out / "labels" / "labels").glob("*.txt"))) == 2

    reset_accelerate()
    variations.main(params, base=base, finetuned=None, real=real, out=out / "variations")
    made = rows(out / "variations" / "manifest.csv")
    sources = list((real / "images" / "train").glob("*.png"))
    assert len(made) == len(sources)
    first = made[0]
    with (
        Image.open(first["source_image"]) as source_image,
        Image.open(out / "variations" / first["file"]) as varied,
    ):
        assert varied.size == source_image.size


@pytest.mark.parametrize(("architecture", "resolution"), [("sdxl", RESOLUTION * 2), ("sd1", RESOLUTION // 2)])
def test_a_resolution_far_from_the_checkpoints_is_refused(
    project: Path, architecture: str, resolution: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD 1.x settings (512 px) on SDXL (1024 px) and the like: the param and its fix, up front."""
    monkeypatch.chdir(project)
    params = load_params(write_params(project, architecture, diffusion={"resolution": resolution}))
    with pytest.raises(GenfusionError) as error:
        base_model.main(
            params, real=Path("data/real"), out=project / "refused", checkpoints=Path("models/checkpoints")
        )
    message = str(error.value)
    assert f"diffusion.resolution: {resolution} px is far from the {RESOLUTION} px" in message
    assert f"set diffusion.resolution: {RESOLUTION}" in message
    assert not (project / "refused").exists()


def test_a_checkpoint_missing_a_component_is_refused_naming_it(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    broken = project / "models/checkpoints/sdxl-broken"
    shutil.copytree(project / "models/checkpoints/sdxl", broken)
    shutil.rmtree(broken / "text_encoder_2")
    params = load_params(write_params(project, "sdxl", diffusion={"base": "models/checkpoints/sdxl-broken"}))
    with pytest.raises(
        GenfusionError, match=r"sdxl-broken lacks text_encoder_2/, which its model_index.json"
    ):
        base_model.main(
            params, real=Path("data/real"), out=project / "refused", checkpoints=Path("models/checkpoints")
        )


def test_a_checkpoint_outside_models_checkpoints_is_refused(
    project: Path, tmp_path: Path, monkeypatch
) -> None:
    """DVC would not see it change: the stage says where to put it and how to version it."""
    monkeypatch.chdir(project)
    elsewhere = shutil.copytree(project / "models/checkpoints/sd1", tmp_path / "sd15")
    params = load_params(write_params(project, "sd1", diffusion={"base": str(elsewhere)}))
    with pytest.raises(GenfusionError) as error:
        base_model.main(
            params, real=Path("data/real"), out=project / "refused", checkpoints=Path("models/checkpoints")
        )
    message = str(error.value)
    assert f"diffusion.base: {elsewhere} is outside models/checkpoints/" in message
    assert "dvc add models/checkpoints/sd15" in message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"diffusion": {"dtype": "float16"}},
            "diffusion.dtype: float16 does not run on diffusion.device: cpu",
        ),
        ({"finetune": {"mixed_precision": "fp16"}}, "finetune.mixed_precision: fp16 needs a GPU"),
        (
            {"subjects": {"canopy": {"instance_prompt": "sks", "finetune": {"mixed_precision": "fp16"}}}},
            "subjects.canopy.finetune.mixed_precision: fp16 needs a GPU",
        ),
    ],
)
def test_half_precision_on_the_cpu_is_refused_naming_the_param_and_the_fix(
    tmp_path: Path, changes: dict, message: str
) -> None:
    path = write_params(tmp_path, "sd1", **changes)
    with pytest.raises(GenfusionError, match=message) as error:
        load_params(path)
    assert "use bf" in str(error.value) and "diffusion.device: cuda" in str(error.value)


@pytest.mark.integration
def test_a_dvc_added_checkpoint_reruns_its_stages_when_edited_and_reaches_temporary_experiments(
    tmp_path: Path,
) -> None:
    """The docs' way: the checkpoint in models/checkpoints/, `dvc add`ed. base_model depends on
    it (an edit reruns it, and the new fingerprint reruns what loads the model), and an
    experiment in a temporary copy of the repository, as a queued one runs, finds it."""
    from checkpoints import save_sd1
    from project import commit, project_repo, run

    repo = project_repo(
        tmp_path / "repo", {"diffusion": {"base": "models/checkpoints/sd1", "resolution": RESOLUTION}}
    )
    run(repo, "dvc", "pull", "-q", "data/seeds/neon-trees.dvc")
    save_sd1(repo / "models/checkpoints/sd1")
    run(repo, "dvc", "add", "-q", "models/checkpoints/sd1")
    commit(repo, "checkpoint")
    assert "Running stage 'base_model'" in run(repo, "dvc", "repro", "base_model")
    assert "up to date" in run(repo, "dvc", "status", "base_model")
    before = json.loads((repo / "models/base/source.json").read_text())["fingerprint"]

    # An edited checkpoint (a link into DVC's cache may be read-only: write a new file).
    config = repo / "models/checkpoints/sd1/scheduler/scheduler_config.json"
    edited = json.loads(config.read_text()) | {"beta_end": 0.013}
    config.unlink()
    config.write_text(json.dumps(edited))
    status = run(repo, "dvc", "status", "base_model")
    assert "changed deps" in status and "models/checkpoints" in status, status
    run(repo, "dvc", "add", "-q", "models/checkpoints/sd1")
    commit(repo, "edited checkpoint")
    assert "Running stage 'base_model'" in run(repo, "dvc", "repro", "base_model")
    assert json.loads((repo / "models/base/source.json").read_text())["fingerprint"] != before

    # A temporary workspace holds only what git and DVC's cache give it.
    done = run(repo, "dvc", "exp", "run", "--temp", "base_model", "-S", "diffusion.seed=1", "-n", "tmp-exp")
    assert "Running stage 'base_model'" in done, done
    assert "tmp-exp" in run(repo, "dvc", "exp", "list")
