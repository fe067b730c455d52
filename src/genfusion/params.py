"""Typed view of params.yaml: one model per stage section, strict about keys and values.

The defaults here are the one source of every default; params.yaml writes each of them out
(with its meaning), and a test fails when the two differ.

An unknown key is an error that suggests the closest known key; a bad value is an
error naming the key and what is allowed. Stages load the whole file so that a typo
anywhere is caught by the first stage that runs, not hours later.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genfusion.errors import GenfusionError
from genfusion.layout import SPLITS
from genfusion.variants import BUILT, MADE, REAL, REGISTRY, SYNTHETIC

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeedsParams(Section):
    source: Path
    format: Literal["auto", "voc", "coco", "yolo", "label_studio"] = "auto"
    class_map: dict[str, str]
    tile_size: PositiveInt = 320
    tile_overlap: Annotated[int, Field(ge=0)] = 64
    min_visibility: Fraction = 0.5
    min_box_size: Annotated[float, Field(ge=0.0)] = 2.0
    split_by: Literal["scene", "tile"] = "scene"
    split: dict[Literal["train", "val", "test"], Fraction] = {"train": 0.7, "val": 0.15, "test": 0.15}
    split_seed: int = 0
    test_scene: str | None = None
    max_pixels: PositiveInt = 500_000_000

    @model_validator(mode="after")
    def _consistent(self) -> SeedsParams:
        if self.test_scene is not None and self.split_by != "scene":
            raise ValueError(
                f"test_scene ({self.test_scene!r}) holds out a whole scene: it needs split_by: scene"
            )
        if self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"tile_overlap ({self.tile_overlap}) must be smaller than tile_size ({self.tile_size})"
            )
        if self.min_box_size >= self.tile_size:
            raise ValueError(
                f"tile_size ({self.tile_size}) is not larger than min_box_size ({self.min_box_size}):"
                " no box could be kept"
            )
        missing = [s for s in SPLITS if s not in self.split]
        if missing:
            raise ValueError(f"split needs a fraction for each of {list(SPLITS)}; missing {missing}")
        total = sum(self.split.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1, they sum to {total:g}: {dict(self.split)}")
        return self


# The dataset variants, as genfusion.variants registers them (`real` is built by its own stage,
# because the real detector labels the generated images some of them train on).
SyntheticVariant = Literal[*SYNTHETIC]
Variant = Literal[REAL, SyntheticVariant]
# The sets a stage makes from the real train tiles, which the quality filter can rank.
MadeVariant = Literal[*MADE]


def two_phase(first: str) -> str:
    """The name of the detector trained on `first`, then fine-tuned on the real train split (its
    folder is `<name>-<seed>`, as every detector's)."""
    return f"{first}-then-real"


class TrainParams(Section):
    # The default run is a tour: every stage runs, and the fewest detectors that show them all
    # train (real, composite and its two-phase row, one seed); profiles/study.yaml trains every
    # variant over three seeds (`make study`).
    variants: list[Variant] = ["real", "composite"]
    seeds: list[int] = [0]
    model: str = "yolov8n.yaml"
    imgsz: PositiveInt = 256
    epochs: PositiveInt = 200
    # Scale each variant's epochs so that it trains on as many images as `epochs` passes over
    # the real train split: the variants then differ in data, not in compute.
    same_steps: bool = True
    batch: PositiveInt = 8
    workers: Annotated[int, Field(ge=0)] = 2
    device: str = "cpu"
    deterministic: bool = True
    patience: Annotated[int, Field(ge=0)] = 0
    optimizer: Literal["SGD", "Adam", "AdamW", "auto"] = "SGD"
    lr0: Annotated[float, Field(gt=0)] = 0.01
    nbs: PositiveInt = 8
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    mosaic: Fraction = 0.0
    close_mosaic: Annotated[int, Field(ge=0)] = 10
    fliplr: Fraction = 0.5
    flipud: Fraction = 0.5
    degrees: Annotated[float, Field(ge=0, le=180)] = 0.0
    scale: Fraction = 0.5
    hsv_h: Fraction = 0.015
    hsv_s: Fraction = 0.7
    hsv_v: Fraction = 0.4
    # Two-phase rows: each of these variants' detectors fine-tuned on the real train split.
    init_from: list[Variant] = ["composite"]

    @property
    def rows(self) -> list[str]:
        """The report's rows: every variant, then every two-phase detector."""
        return [*self.variants, *(two_phase(first) for first in self.init_from)]

    @model_validator(mode="after")
    def _first_phase_trained(self) -> TrainParams:
        wrong = [v for v in self.init_from if v == "real" or v not in self.variants]
        if wrong or len(set(self.init_from)) != len(self.init_from):
            raise ValueError(
                f"init_from: {self.init_from} must name variants of train.variants {self.variants},"
                " each once and not real: their detectors are the first phase, fine-tuned on real"
            )
        return self

    @field_validator("imgsz")
    @classmethod
    def _stride_multiple(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (YOLO's stride), got {v}")
        return v

    @field_validator("variants", "seeds")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one entry")
        if len(set(v)) != len(v):
            raise ValueError(f"has duplicates: {v}")
        return v


class LabelsParams(Section):
    source: Literal["auto", "manual", "manual_else_auto"] = "auto"


class DatasetsParams(Section):
    variants: list[SyntheticVariant] = list(BUILT)
    mixed_ratio: Annotated[float, Field(ge=0)] = 1.0


class PredictParams(Section):
    slice: PositiveInt = 320
    overlap: NonNegativeInt = 64
    merge: Literal["nms", "nmm", "wbf"] = "nms"
    match_metric: Literal["iou", "ios"] = "ios"
    match_threshold: Fraction = 0.5
    batch: PositiveInt = 8
    conf: Fraction = 0.25
    iou: Fraction = 0.7

    @model_validator(mode="after")
    def _slices_advance(self) -> PredictParams:
        if self.overlap >= self.slice:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than slice ({self.slice})")
        return self


# The scene sets the seeds stage writes (the test and val splits whole); an extra set may not
# take their names.
TEST_SET = "test"
VAL_SET = "val"


class EvaluateParams(Section):
    conf: Fraction = 0.001
    iou: Fraction = 0.7
    pr_conf: Fraction = 0.25
    bootstrap: NonNegativeInt = 1000
    bootstrap_cell: PositiveInt | None = 100
    bootstrap_seed: int = 0
    extra_sets: dict[str, str] = {}

    @field_validator("extra_sets")
    @classmethod
    def _named_apart(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name in (TEST_SET, VAL_SET) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(
                    f"{name!r}: an extra set's name is a folder name (letters, digits, _ . -),"
                    f" and neither {TEST_SET!r} nor {VAL_SET!r}"
                )
        return v


class ReportParams(Section):
    conf: Fraction = 0.25


Prompt = Annotated[str, Field(min_length=1)]
# Inference schedulers by name (mapped to diffusers classes in genfusion.diffusion.pipelines.SCHEDULERS).
SchedulerName = Literal["ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmsolver++", "unipc"]


class DiffusionParams(Section):
    base: Annotated[str, Field(min_length=1)] = "builtin:tiny"
    revision: str | None = None
    resolution: PositiveInt = 64
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    attention_slicing: bool = False
    processes: PositiveInt = 1
    pretrain_steps: NonNegativeInt = 300
    pretrain_vae_steps: NonNegativeInt = 120
    pretrain_batch: PositiveInt = 8
    pretrain_lr: Annotated[float, Field(gt=0)] = 2e-3
    seed: int = 0
    class_prompt: Prompt = "an aerial photo of tree crowns"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the autoencoder's stride), got {v}")
        return v


class GenerateParams(Section):
    n: NonNegativeInt | Literal["match_real"] = "match_real"
    prompts: Annotated[list[Prompt], Field(min_length=1)] = ["{instance_prompt}"]
    negative_prompt: str = ""
    guidance: Annotated[float, Field(ge=0)] = 2.0
    steps: PositiveInt = 20
    scheduler: SchedulerName = "ddim"
    batch: PositiveInt = 4
    seed: int = 0


def check_runs_a_step(steps: int, strength: float, what: str) -> None:
    """img2img and inpainting run int(steps * strength) of the sampler's steps: at least one."""
    if int(steps * strength) < 1:
        raise ValueError(
            f"steps x strength must be at least 1 ({what} runs int(steps * strength) steps),"
            f" got {steps} x {strength}"
        )


class VariationsParams(Section):
    # Chosen on the folds' val scenes (reports/tuning-variations.md).
    per_image: NonNegativeInt = 8
    strength: Annotated[float, Field(gt=0, le=1)] = 0.4
    guidance: Annotated[float, Field(ge=0)] = 2.0
    steps: PositiveInt = 20
    prompt: Prompt = "{class_prompt}"
    scheduler: SchedulerName = "ddim"
    batch: PositiveInt = 4
    seed: int = 0

    @model_validator(mode="after")
    def _runs_a_step(self) -> VariationsParams:
        check_runs_a_step(self.steps, self.strength, "img2img")
        return self


class LayoutParams(Section):
    """What composite and inpaint share: how many objects go on each real train tile, where, at
    what size, and which labels the later ones hide."""

    # The params.yaml section of a subclass, which the shared code names in its errors.
    section: ClassVar[str]
    per_image: NonNegativeInt = 4
    density: Annotated[float, Field(gt=0)] = 0.5
    scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.8, 1.25)
    rotate: bool = True
    max_occlusion: Fraction = 0.5
    min_size: PositiveInt = 8
    seed: int = 0

    @model_validator(mode="after")
    def _scale_is_a_range(self) -> LayoutParams:
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale is [min, max], got {list(self.scale)}")
        return self


class CompositeParams(LayoutParams):
    section: ClassVar[str] = "composite"
    # Chosen on the folds' val scenes (reports/tuning-composite.md); inpaint keeps 4.
    per_image: NonNegativeInt = 8
    flip: bool = True
    colour_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    blend: Literal["gaussian", "poisson"] = "gaussian"
    feather: Annotated[float, Field(ge=0)] = 1.5
    batch: PositiveInt = 16


class InpaintParams(LayoutParams):
    section: ClassVar[str] = "inpaint"
    # Chosen on the folds' val scenes (reports/tuning-inpaint.md); composite keeps 0.5.
    density: Annotated[float, Field(gt=0)] = 1.0
    mask_grow: NonNegativeInt = 2
    strength: Annotated[float, Field(gt=0, le=1)] = 0.9
    guidance: Annotated[float, Field(ge=0)] = 2.0
    steps: PositiveInt = 20
    prompt: Prompt = "{instance_prompt}"
    scheduler: SchedulerName = "ddim"
    checkpoint: str | None = None
    controlnet: str | None = None
    controlnet_scale: Annotated[float, Field(ge=0)] = 1.0
    batch: PositiveInt = 4

    @model_validator(mode="after")
    def _runs_a_step(self) -> InpaintParams:
        check_runs_a_step(self.steps, self.strength, "inpainting")
        return self


class FilterParams(Section):
    sets: dict[MadeVariant, str] = {
        "composite": "data/composites",
        "inpaint": "data/inpainted/canopy",
    }
    keep: Annotated[float, Field(gt=0, le=1)] = 0.75
    clip: str | None = None


class FinetuneParams(Section):
    method: Literal["lora", "full"] = "lora"
    steps: PositiveInt = 100
    lr: Annotated[float, Field(gt=0)] = 1e-3
    batch: PositiveInt = 4
    grad_accum: PositiveInt = 1
    # fp32, not accelerate's "no": `dvc exp run -S` writes YAML unquoted, and `no` reads as false.
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    lora_rank: PositiveInt = 8
    prior_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    num_class_images: NonNegativeInt = 50
    seed: int = 0

    @model_validator(mode="after")
    def _steps_are_optimizer_steps(self) -> FinetuneParams:
        if self.steps < self.grad_accum:
            raise ValueError(
                f"steps ({self.steps}) counts optimizer steps, each of grad_accum ({self.grad_accum})"
                " batches; fewer steps than grad_accum looks like a count of batches: give the number of"
                " optimizer steps (steps x grad_accum batches are drawn in all), or lower grad_accum"
            )
        return self


class SelectParams(Section):
    scenes: list[str] = []
    classes: list[str] = []
    pattern: Prompt = "*"


class SubjectParams(Section):
    instance_prompt: Prompt
    # Defaults to diffusion.class_prompt, the prompt the base model knows the domain by.
    class_prompt: Prompt | None = None
    select: SelectParams = SelectParams()
    # The `finetune` keys that differ for this subject.
    finetune: dict[str, Any] = {}


class PrelabelParams(Section):
    method: Literal["attention", "detector"] = "detector"
    blocks: Annotated[list[Literal["down", "mid", "up"]], Field(min_length=1)] = ["down", "mid", "up"]
    map_size: PositiveInt | Literal["auto"] = "auto"
    steps: tuple[Fraction, Fraction] = (0.0, 1.0)
    self_exponent: NonNegativeInt = 4
    low: Fraction = 0.4
    high: Fraction = 0.6
    min_box_area: NonNegativeInt = 16
    seed: int = 0
    conf: Fraction = 0.25
    iou: Fraction = 0.7

    @model_validator(mode="after")
    def _ordered(self) -> PrelabelParams:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not be above high ({self.high})")
        if self.steps[0] >= self.steps[1]:
            raise ValueError(
                f"steps must be [first, last) fractions with first < last, got {list(self.steps)}"
            )
        return self


class AnnotateParams(Section):
    url: str = "http://127.0.0.1:8080"
    home: str = ".labelstudio"
    project: Annotated[str, Field(min_length=1)] = "genfusion {subject}"
    document_root: str | None = None

    @field_validator("project")
    @classmethod
    def _names_the_subject(cls, v: str) -> str:
        if "{subject}" not in v:
            raise ValueError(f"must contain {{subject}} (one project per subject), got {v!r}")
        return v


class InspectParams(Section):
    dataset: Annotated[str, Field(min_length=1)] = "genfusion"
    database_dir: str = ".fiftyone"
    embedding: Literal["descriptor", "clip"] = "descriptor"
    clip_model: str | None = None
    memorisation_threshold: Fraction = 0.95
    leakage_threshold: Fraction = 0.95
    app_port: Annotated[int, Field(ge=1, le=65535)] = 5151

    @model_validator(mode="after")
    def _clip_named(self) -> InspectParams:
        if self.embedding == "clip" and not self.clip_model:
            raise ValueError("embedding: clip needs clip_model (a local folder or a cached hub id)")
        return self


class Params(Section):
    classes: list[str]
    task: Literal["detect", "segment"] = "detect"
    threads: PositiveInt | None = None
    seeds: SeedsParams
    labels: LabelsParams = LabelsParams()
    datasets: DatasetsParams = DatasetsParams()
    train: TrainParams = TrainParams()
    predict: PredictParams = PredictParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    diffusion: DiffusionParams = DiffusionParams()
    generate: GenerateParams = GenerateParams()
    variations: VariationsParams = VariationsParams()
    composite: CompositeParams = CompositeParams()
    inpaint: InpaintParams = InpaintParams()
    filter: FilterParams = FilterParams()
    finetune: FinetuneParams = FinetuneParams()
    subjects: dict[str, SubjectParams] = {}
    prelabel: PrelabelParams = PrelabelParams()
    annotate: AnnotateParams = AnnotateParams()
    inspect: InspectParams = InspectParams()

    @model_validator(mode="after")
    def _classes_known(self) -> Params:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list without duplicates: {self.classes}")
        for name, subject in self.subjects.items():
            unknown = sorted(set(subject.select.classes) - set(self.classes))
            if unknown:
                raise ValueError(
                    f"subjects.{name}.select.classes: {unknown} are not in classes {self.classes}"
                )
            self.finetune_for(name)
        self._precision_runs_on_device()
        segmentation_model = "-seg" in Path(self.train.model).stem
        if (self.task == "segment") != segmentation_model:
            raise ValueError(
                f"task is {self.task} but train.model {self.train.model!r} is a"
                f" {'segmentation' if segmentation_model else 'detection'} model; pair task: segment"
                " with a -seg model (yolov8n-seg.yaml) and task: detect with a detector (yolov8n.yaml)"
            )
        filtered = [REGISTRY[v] for v in self.datasets.variants]
        unfiltered = [v.name for v in filtered if v.filtered_from and v.filtered_from not in self.filter.sets]
        if unfiltered:
            raise ValueError(
                f"datasets.variants: {unfiltered} need their sets in filter.sets {list(self.filter.sets)}"
            )
        unbuilt = [v for v in self.train.variants if v != "real" and v not in self.datasets.variants]
        if unbuilt:
            raise ValueError(
                f"train.variants: {unbuilt} are not built; add them to datasets.variants"
                f" {self.datasets.variants}"
            )
        for source_name, target in self.seeds.class_map.items():
            if target not in self.classes:
                raise ValueError(
                    f"seeds.class_map maps {source_name!r} to {target!r}, which is not in"
                    f" classes {self.classes}"
                )
        return self

    def _precision_runs_on_device(self) -> None:
        """Half precision (float16) has no fast CPU kernels: diffusers warns that it fails, and it
        runs several times slower; accelerate ignores fp16 mixed precision on the CPU."""
        if self.diffusion.device != "cpu":
            return
        if self.diffusion.dtype == "float16":
            raise ValueError(
                "diffusion.dtype: float16 does not run on diffusion.device: cpu; use bfloat16 (or"
                " float32) on the CPU, or set diffusion.device: cuda"
            )
        settings = [("finetune", self.finetune)] + [
            (f"subjects.{name}.finetune", self.finetune_for(name)) for name in self.subjects
        ]
        for key, finetune in settings:
            if finetune.mixed_precision == "fp16":
                raise ValueError(
                    f"{key}.mixed_precision: fp16 needs a GPU and diffusion.device is cpu; use bf16"
                    " (or fp32) on the CPU, or set diffusion.device: cuda"
                )

    def subject(self, name: str) -> SubjectParams:
        """The subject `name`, with its class prompt defaulting to diffusion.class_prompt."""
        if name not in self.subjects:
            known = sorted(self.subjects)
            raise GenfusionError(f"subjects: no subject {name!r}; params.yaml defines {known}")
        subject = self.subjects[name]
        if subject.class_prompt is None:
            subject = subject.model_copy(update={"class_prompt": self.diffusion.class_prompt})
        return subject

    def finetune_for(self, name: str) -> FinetuneParams:
        """`finetune` with the subject's own overrides applied, validated like the section."""
        overrides = self.subjects[name].finetune
        try:
            return FinetuneParams.model_validate(self.finetune.model_dump() | overrides)
        except ValidationError as exc:
            problems = "; ".join(_describe(e, FinetuneParams) for e in exc.errors())
            raise ValueError(f"subjects.{name}.finetune: {problems}") from exc


# The train stages' DVC dependency (dvc.yaml, paths.pretrained), relative to the project folder.
PRETRAINED = Path("models/pretrained")


def check_pretrained_weights(model: str, project: Path | None = None) -> None:
    """Refuse `train.model` weights (a .pt) outside `models/pretrained/` of `project` (default: the
    working directory, where DVC runs the stage): the train stages depend on that folder, so
    weights elsewhere could change without DVC retraining the detectors."""
    if not model.endswith(".pt"):
        return
    project = Path.cwd() if project is None else Path(project)
    folder = (project / PRETRAINED).resolve()
    # The file's folder, not the file: with DVC's symlink cache the file links into .dvc/cache.
    if not (project / model).parent.resolve().is_relative_to(folder):
        raise GenfusionError(
            f"train.model: weights file {model!r} is outside {PRETRAINED}/, the folder the train stages"
            f" depend on, so DVC would not retrain when it changes; copy it into {PRETRAINED}/,"
            f" `dvc add {PRETRAINED}/{Path(model).name}` and set train.model to that path"
        )


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model that `loc` points into."""
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        annotation = field.annotation if field else None
        if typing.get_origin(annotation) is dict:
            # dict[str, Model]: the next part of `loc` is a key such as a subject name.
            annotation = typing.get_args(annotation)[1]
            parts = parts[1:]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any], model: type[BaseModel] | None = None) -> str:
    loc = error["loc"]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(model or Params, loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not loc:  # a check across sections: the message names the keys, the input is the whole file
        return message
    given = error.get("input")
    # A check of a whole section gets the section as input, and some messages quote the value.
    if isinstance(given, dict) or "got " in message:
        return f"{key}: {message}"
    return f"{key}: {message} (got {given!r})"


def parse_params(data: Any, path: Path = Path("params.yaml")) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        # One line per problem, each naming the file and the key.
        raise GenfusionError("\n".join(f"{path}: {_describe(e)}" for e in exc.errors())) from exc


PARAMS_MISSING = "params file not found (run from the project root)"


def read_yaml(path: Path, missing: str) -> Any:
    """A YAML file's data; `missing` says what to do when the file does not exist."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise GenfusionError(f"{path}: {missing}") from exc
    except yaml.YAMLError as exc:
        raise GenfusionError(f"{path}: not valid YAML: {exc}") from exc


def load_params(path: Path = Path("params.yaml")) -> Params:
    return parse_params(read_yaml(path, PARAMS_MISSING), Path(path))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys `dvc exp run -S` takes."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def override_value(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's). Strings other than plain
    words and paths are quoted, so that commas and spaces are not read as a sweep and "0"
    stays a string."""
    if isinstance(value, str):
        if re.fullmatch(r"[A-Za-z_][\w./:@-]*", value) and value.lower() not in ("true", "false", "null"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)


def with_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Params data with `key=value` overrides applied in turn, each value read as YAML: what
    `dvc exp run -S` writes for the overrides `override_value` makes."""
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise GenfusionError(f"-S {override!r}: an override is key=value (train.seeds=[0])")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise GenfusionError(f"-S {override!r}: the value is not valid YAML: {exc}") from exc
        data = _merged(data, _nested(key.split("."), parsed))
    return data


def profile_overrides(profile_path: Path, params_path: Path = Path("params.yaml")) -> list[str]:
    """`key=value` overrides (for `dvc exp run -S`) that turn params.yaml into the profile.

    A profile is a params file holding only what differs, plus an optional `sweep:` mapping of
    dotted keys to lists of values, which DVC expands into one queued experiment per
    combination. Every combination is validated here, before anything runs.
    """
    overrides, sweep = profile_sweep(profile_path, params_path)
    return overrides + [f"{key}={','.join(override_value(v) for v in vs)}" for key, vs in sweep.items()]


def profile_trials(profile_path: Path, params_path: Path = Path("params.yaml")) -> list[list[str]]:
    """The profile's overrides for each combination of its sweep (one, without a sweep)."""
    overrides, sweep = profile_sweep(profile_path, params_path)
    return [
        overrides + [f"{key}={override_value(value)}" for key, value in zip(sweep, combination, strict=True)]
        for combination in itertools.product(*sweep.values())
    ]


def profile_sweep(profile_path: Path, params_path: Path) -> tuple[list[str], dict[str, list]]:
    """A profile's overrides and its sweep (dotted key -> values), every combination validated."""
    profile_path = Path(profile_path)
    profile = read_yaml(profile_path, "profile not found")
    if not isinstance(profile, dict):
        raise GenfusionError(f"{profile_path}: a profile is a mapping of params sections")
    sweep = profile.pop("sweep", None) or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise GenfusionError(f"{profile_path}: sweep: maps dotted keys to non-empty lists of values")
    base = _merged(read_yaml(params_path, PARAMS_MISSING), profile)
    for combination in itertools.product(*sweep.values()):
        values = base
        for key, value in zip(sweep, combination, strict=True):
            values = _merged(values, _nested(key.split("."), value))
        parse_params(values, profile_path)
    return [f"{key}={override_value(value)}" for key, value in flatten(profile).items()], sweep


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: _nested(keys[1:], value) if len(keys) > 1 else value}


def _merged(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in update.items()}}
    return update
