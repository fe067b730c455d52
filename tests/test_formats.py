"""Importers: the real VOC sample, round trips through COCO / YOLO / Label Studio, every error."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats import detect_format, read_annotations
from genfusion.formats.yolo import yolo_line


@pytest.fixture(scope="session")
def neon(neon_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real NEON seeds: 3 PNG scenes with VOC XML (61, 37 and 279 boxes)."""
    copy = tmp_path_factory.mktemp("neon-trees")
    for path in [*neon_seeds.glob("*.xml"), *neon_seeds.glob("*.png")]:
        shutil.copyfile(path, copy / path.name)
    return copy


@pytest.fixture(scope="session")
def voc_items(neon: Path) -> list[LabelledImage]:
    return read_annotations(neon, "voc")


def at(path: Path) -> str:
    """A regex matching `path` literally, for pytest.raises(match=...)."""
    return re.escape(str(path))


def png(path: Path, size: tuple[int, int] = (20, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)
    return path


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def assert_same_boxes(got: list[LabelledImage], want: list[LabelledImage], tolerance: float) -> None:
    assert [item.image.name for item in got] == [item.image.name for item in want]
    for read, original in zip(got, want, strict=True):
        assert read.size == original.size
        assert len(read.boxes) == len(original.boxes)
        for a, b in zip(read.boxes, original.boxes, strict=True):
            assert a.label == b.label
            assert max(abs(a.x0 - b.x0), abs(a.y0 - b.y0), abs(a.x1 - b.x1), abs(a.y1 - b.y1)) <= tolerance


# --- the real sample ------------------------------------------------------------------


def test_voc_sample_reads_every_box(voc_items: list[LabelledImage]) -> None:
    counts = {item.image.name: len(item.boxes) for item in voc_items}
    assert counts == {
        "2019_YELL_2_541000_4977000_image_crop.png": 279,
        "OSBS_029.png": 61,
        "SOAP_061.png": 37,
    }
    assert {box.label for item in voc_items for box in item.boxes} == {"Tree", "Alive", "Dead"}
    assert [item.size for item in voc_items] == [(1249, 1035), (400, 400), (400, 400)]
    assert all(item.image.is_file() and item.source == item.image.with_suffix(".xml") for item in voc_items)
    first = voc_items[0].boxes[0]
    assert first == Box("Tree", 1012.0, 161.0, 1041.0, 196.0)


def test_voc_filename_of_a_converted_image_falls_back_to_the_stem(voc_items: list[LabelledImage]) -> None:
    osbs = next(item for item in voc_items if item.image.stem == "OSBS_029")
    assert "<filename>OSBS_029.tif</filename>" in osbs.source.read_text()
    assert osbs.image == osbs.source.with_suffix(".png")


# --- writers for the round trips --------------------------------------------------------


def write_coco(items: list[LabelledImage], out: Path) -> Path:
    """COCO json with its images in images/ beside it (the second place the reader looks)."""
    labels = sorted({box.label for item in items for box in item.boxes})
    images, annotations = [], []
    for image_id, item in enumerate(items, 1):
        shutil.copyfile(item.image, png(out / "images" / item.image.name))
        images.append(
            {"id": image_id, "file_name": item.image.name, "width": item.size[0], "height": item.size[1]}
        )
        for box in item.boxes:
            bbox = [box.x0, box.y0, box.width, box.height]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": bbox,
                    "category_id": labels.index(box.label) + 1,
                }
            )
    categories = [{"id": i, "name": label} for i, label in enumerate(labels, 1)]
    write_json(
        out / "instances.json", {"images": images, "annotations": annotations, "categories": categories}
    )
    return out


def write_yolo(items: list[LabelledImage], out: Path) -> Path:
    labels = sorted({box.label for item in items for box in item.boxes})
    for item in items:
        shutil.copyfile(item.image, png(out / "images" / "train" / item.image.name))
        lines = [yolo_line(box, labels.index(box.label), *item.size) for box in item.boxes]
        label = out / "labels" / "train" / f"{item.image.stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + "\n")
    data = {"path": ".", "train": "images/train", "names": dict(enumerate(labels))}
    (out / "data.yaml").write_text(yaml.safe_dump(data))
    return out


def ls_result(box: Box, size: tuple[int, int], rotation: float = 0.0) -> dict:
    width, height = size
    value = {
        "x": box.x0 / width * 100,
        "y": box.y0 / height * 100,
        "width": box.width / width * 100,
        "height": box.height / height * 100,
        "rotation": rotation,
        "rectanglelabels": [box.label],
    }
    return {"type": "rectanglelabels", "original_width": width, "original_height": height, "value": value}


def ls_task(task_id: int, image: str, *annotations: dict) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": list(annotations)}


def ls_annotation(
    annotation_id: int, results: list[dict], updated_at: str | None = None, cancelled: bool = False
) -> dict:
    return {"id": annotation_id, "result": results, "updated_at": updated_at, "was_cancelled": cancelled}


def write_label_studio(items: list[LabelledImage], out: Path, upload: bool) -> Path:
    """An export whose images are local files under some/dir/, or uploads (with the hex prefix) beside it."""
    tasks = []
    for task_id, item in enumerate(items, 1):
        name = item.image.name
        if upload:
            shutil.copyfile(item.image, png(out / name))
            image = f"/data/upload/1/8c1a2b3c-{name}"
        else:
            shutil.copyfile(item.image, png(out / "some" / "dir" / name))
            image = f"/data/local-files/?d=some/dir/{name}"
        results = [ls_result(box, item.size) for box in item.boxes]
        tasks.append(ls_task(task_id, image, ls_annotation(1, results)))
    write_json(out / "export.json", tasks)
    return out


WRITERS: dict[str, tuple[str, Callable[[list[LabelledImage], Path], Path], float]] = {
    "coco": ("coco", write_coco, 1e-3),
    # YOLO keeps 6 decimals of the normalised value: up to 0.6 px on a 1249 px scene.
    "yolo": ("yolo", write_yolo, 1.0),
    "label_studio_local_files": ("label_studio", lambda i, o: write_label_studio(i, o, upload=False), 1e-3),
    "label_studio_upload": ("label_studio", lambda i, o: write_label_studio(i, o, upload=True), 1e-3),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_round_trip_through_each_format(voc_items: list[LabelledImage], tmp_path: Path, writer: str) -> None:
    fmt, write, tolerance = WRITERS[writer]
    out = write(voc_items, tmp_path / writer)
    assert detect_format(out) == fmt
    read = read_annotations(out)
    assert_same_boxes(read, voc_items, tolerance)
    assert all(item.image.is_file() and item.image.is_relative_to(out) for item in read)


def test_detect_format_names_the_format_of_single_files(
    voc_items: list[LabelledImage], tmp_path: Path
) -> None:
    item = [voc_items[1]]
    assert detect_format(write_coco(item, tmp_path / "c") / "instances.json") == "coco"
    assert detect_format(write_yolo(item, tmp_path / "y") / "data.yaml") == "yolo"
    assert (
        detect_format(write_label_studio(item, tmp_path / "l", upload=True) / "export.json") == "label_studio"
    )


def test_detect_format_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match=at(tmp_path) + r": no annotations found: looked for a \.json"):
        detect_format(tmp_path)


def test_detect_format_refuses_a_folder_of_two_formats(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {})
    (tmp_path / "b.xml").write_text("<annotation/>")
    with pytest.raises(GenfusionError, match=r"found a \.json .* and \.xml files \(Pascal VOC\)"):
        detect_format(tmp_path)


# --- errors every format shares ---------------------------------------------------------


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        GenfusionError, match=at(tmp_path) + r": unknown annotation format 'pascal'; expected auto"
    ):
        read_annotations(tmp_path, "pascal")


def test_empty_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GenfusionError, match=at(tmp_path) + r": no annotations found \(voc\)"):
        read_annotations(tmp_path, "voc")
    write_json(tmp_path / "x.json", {"images": [], "annotations": [], "categories": []})
    with pytest.raises(GenfusionError, match=r"no annotations found \(coco\): no annotated image"):
        read_annotations(tmp_path)


def test_images_without_a_single_box_are_refused(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text("<annotation><filename>a.png</filename></annotation>")
    with pytest.raises(GenfusionError, match=r"no annotations found \(voc\): none of its 1 images has a box"):
        read_annotations(tmp_path)


@pytest.mark.parametrize("fmt", ["coco", "label_studio"])
def test_malformed_json_names_file_and_place(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "export.json"
    path.write_text('[{"id": 1,\n "data": }]' if fmt == "label_studio" else '{"images": [,]}')
    with pytest.raises(
        GenfusionError, match=at(path) + r": malformed JSON: Expecting value at line \d+, column \d+"
    ):
        read_annotations(tmp_path, fmt)


# --- Pascal VOC ------------------------------------------------------------------------


def voc_xml(filename: str, *objects: str) -> str:
    return (
        f"<annotation><filename>{filename}</filename><size><width>20</width><height>10</height></size>"
        + "".join(f"<object>{o}</object>" for o in objects)
        + "</annotation>"
    )


TREE = "<name>Tree</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5.5</xmax><ymax>6</ymax></bndbox>"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><filename>a.png", r"malformed XML: (no element found|unclosed token): line 1"),
        (
            voc_xml("a.png", "<name>Tree</name><bndbox><xmin>1</xmin><ymin>2</ymin><ymax>6</ymax></bndbox>"),
            r"object 1: <bndbox> has no <xmax>",
        ),
        (voc_xml("a.png", TREE, "<bndbox><xmin>1</xmin></bndbox>"), r"object 2: <object> has no <name>"),
        (
            voc_xml("a.png", TREE.replace("<xmin>1<", "<xmin>ten<")),
            r"object 1: <xmin> is not a number: 'ten'",
        ),
        ("<Annotation/>", r"not a Pascal VOC annotation: the root element is <Annotation>"),
    ],
)
def test_voc_bad_xml_names_file_and_problem(tmp_path: Path, xml: str, message: str) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(xml)
    with pytest.raises(GenfusionError, match=at(tmp_path / "a.xml") + ": " + message):
        read_annotations(tmp_path)


def test_voc_keeps_float_and_out_of_image_boxes_as_written(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    outside = (
        "<name>Dead</name><bndbox><xmin>-3.25</xmin><ymin>4</ymin><xmax>30</xmax><ymax>4</ymax></bndbox>"
    )
    (tmp_path / "a.xml").write_text(voc_xml("a.png", TREE, outside))
    (item,) = read_annotations(tmp_path)
    assert item.boxes == (Box("Tree", 1, 2, 5.5, 6), Box("Dead", -3.25, 4, 30, 4))


def test_voc_annotation_without_its_image(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text(voc_xml("a.tif", TREE))
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "a.xml")
        + r": label file without its image: looked for "
        + at(tmp_path / "a.tif")
        + " or an image "
        + at(tmp_path / "a")
        + r"\.\*",
    ):
        read_annotations(tmp_path)


def test_voc_image_without_annotation(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "a.xml").write_text(voc_xml("a.png", TREE))
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "b.png") + r": image has no label file; add a \.xml"
        r" holding an <annotation> with no <object> to mark an image with no objects",
    ):
        read_annotations(tmp_path)


def test_voc_duplicate_image_names_in_two_folders(tmp_path: Path) -> None:
    for folder in ("one", "two"):
        png(tmp_path / folder / "a.png")
        (tmp_path / folder / "a.xml").write_text(voc_xml("a.png", TREE))
    with pytest.raises(
        GenfusionError,
        match=r"duplicate image name 'a': "
        + at(tmp_path / "one" / "a.png")
        + " and "
        + at(tmp_path / "two" / "a.png"),
    ):
        read_annotations(tmp_path)


def test_voc_devkit_layout_finds_images_in_a_sibling_folder(tmp_path: Path) -> None:
    png(tmp_path / "JPEGImages" / "a.png")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(voc_xml("a.png", TREE))
    (item,) = read_annotations(tmp_path)
    assert item.image == tmp_path / "JPEGImages" / "a.png"


# --- COCO ------------------------------------------------------------------------------


def coco(annotations: list[dict], images: list[dict] | None = None) -> dict:
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}]
    return {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "Tree"}]}


def test_coco_listed_image_without_annotations_has_no_boxes(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png", "width": 20, "height": 10}]
    write_json(tmp_path / "x.json", coco([{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3.5, 4]}], images))
    a, b = read_annotations(tmp_path / "x.json")
    assert (a.boxes, a.size) == ((Box("Tree", 1, 2, 4.5, 6),), None)
    assert (b.boxes, b.size) == ((), (20, 10))


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"image_id": 1, "category_id": 3}, r"annotations\[0\] has no 'bbox'"),
        (
            {"image_id": 1, "category_id": 3, "bbox": [1, 2, "wide", 4]},
            r"annotations\[0\]: bbox\[2\] is not a number: 'wide'",
        ),
        (
            {"image_id": 1, "category_id": 3, "bbox": [1, 2, 3]},
            r"annotations\[0\]: bbox must be \[x, y, width, height\]",
        ),
        (
            {"image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]},
            r"annotations\[0\]: image_id 7 is not in 'images'",
        ),
        (
            {"image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]},
            r"annotations\[0\]: category_id 9 is not in 'categories'",
        ),
    ],
)
def test_coco_bad_annotation_names_file_and_problem(tmp_path: Path, annotation: dict, message: str) -> None:
    png(tmp_path / "a.png")
    path = write_json(tmp_path / "x.json", coco([annotation]))
    with pytest.raises(GenfusionError, match=at(path) + ": " + message):
        read_annotations(tmp_path)


def test_coco_missing_top_level_field(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", {"images": [], "annotations": []})
    with pytest.raises(GenfusionError, match=at(path) + " has no 'categories'"):
        read_annotations(path)


def test_coco_image_file_missing(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", coco([]))
    with pytest.raises(
        GenfusionError,
        match=at(path)
        + r": images\[0\]: label file without its image: looked for "
        + at(tmp_path / "a.png")
        + " or "
        + at(tmp_path / "images" / "a.png"),
    ):
        read_annotations(path)


def test_coco_folder_must_hold_exactly_one_json(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", coco([]))
    write_json(tmp_path / "b.json", coco([]))
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path) + r": expected exactly one JSON file in the folder, found 2: a\.json, b\.json",
    ):
        read_annotations(tmp_path, "coco")


def test_coco_duplicate_image_names(tmp_path: Path) -> None:
    png(tmp_path / "one" / "a.png")
    png(tmp_path / "two" / "a.png")
    images = [{"id": 1, "file_name": "one/a.png"}, {"id": 2, "file_name": "two/a.png"}]
    write_json(tmp_path / "x.json", coco([{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}], images))
    with pytest.raises(GenfusionError, match=r"duplicate image name 'a': .*one/a\.png and .*two/a\.png"):
        read_annotations(tmp_path)


# --- YOLO ------------------------------------------------------------------------------


def yolo_dataset(root: Path, labels: dict[str, str], data: dict | None = None) -> Path:
    """images/train/<name>.png (20 x 10) and labels/train/<name>.txt for each entry; None: no label file."""
    for name, text in labels.items():
        png(root / "images" / "train" / f"{name}.png")
        if text is not None:
            label = root / "labels" / "train" / f"{name}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    path = root / "data.yaml"
    path.write_text(
        yaml.safe_dump(data or {"train": "images/train", "val": "images/train", "names": ["Tree", "Dead"]})
    )
    return path


def test_yolo_reads_boxes_and_an_empty_label_file_as_no_objects(tmp_path: Path) -> None:
    yolo_dataset(tmp_path, {"a": "1 0.5 0.5 0.2 0.4\n\n", "b": ""})
    a, b = read_annotations(tmp_path)  # train and val share the folder: each image once
    assert a.size == (20, 10) and a.source == tmp_path / "labels" / "train" / "a.txt"
    assert a.boxes[0].label == "Dead"
    assert [a.boxes[0].x0, a.boxes[0].y0, a.boxes[0].x1, a.boxes[0].y1] == pytest.approx([8, 3, 12, 7])
    assert b.boxes == ()


def test_yolo_size_follows_exif_orientation(tmp_path: Path) -> None:
    yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.5 0.5\n"})
    stored = Image.new("RGB", (20, 10))
    exif = stored.getexif()
    exif[0x0112] = 6  # shown turned a quarter: 10 wide, 20 high
    stored.save(tmp_path / "images" / "train" / "a.png", exif=exif.tobytes())
    (item,) = read_annotations(tmp_path)
    assert item.size == (10, 20)
    assert item.boxes == (Box("Tree", 2.5, 5, 7.5, 15),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0.5 0.5 0.2 0.2\n0 0.5 abc 0.2 0.2\n", r"a\.txt: line 2: bad YOLO line '0 0\.5 abc 0\.2 0\.2'"),
        ("0 0.5 0.5 0.2\n", r"a\.txt: line 1: bad YOLO line .*expected class cx cy w h .* got 4 numbers"),
        ("5 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: bad YOLO line .*class id 5 is not in 0\.\.1"),
        (
            "0 0.1 0.1 0.9 0.1 0.5 0.9 0.5\n",
            r"a\.txt: line 1: bad YOLO line .*an outline of at least 3 points\), got 8 numbers",
        ),
    ],
)
def test_yolo_bad_line_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    yolo_dataset(tmp_path, {"a": text})
    with pytest.raises(GenfusionError, match=at(tmp_path / "labels" / "train") + "/" + message):
        read_annotations(tmp_path)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
@pytest.mark.parametrize(
    "line",
    [
        "0 {} 0.5 0.2 0.2",
        "0 0.5 {} 0.2 0.2",
        "0 0.5 0.5 {} 0.2",
        "0 0.5 0.5 0.2 {}",
        "0 {} 0.1 0.9 0.1 0.5 0.9",
        "0 0.1 0.1 0.9 {} 0.5 0.9",
        "0 0.1 0.1 0.9 0.1 0.5 {}",
    ],
)
def test_yolo_non_finite_coordinate_names_file_and_line(tmp_path: Path, line: str, value: str) -> None:
    line = line.format(value)
    yolo_dataset(tmp_path, {"a": f"0 0.5 0.5 0.2 0.2\n{line}\n"})
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "labels" / "train" / "a.txt")
        + ": line 2: bad YOLO line "
        + re.escape(repr(line))
        + ": not a number: "
        + re.escape(repr(value)),
    ):
        read_annotations(tmp_path)


@pytest.mark.parametrize("class_id", ["0.5", "nan", "-inf", "1e400"])
@pytest.mark.parametrize("rest", ["0.5 0.5 0.2 0.2", "0.1 0.1 0.9 0.1 0.5 0.9"])
def test_yolo_class_id_must_be_a_whole_number(tmp_path: Path, class_id: str, rest: str) -> None:
    yolo_dataset(tmp_path, {"a": f"{class_id} {rest}\n"})
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "labels" / "train" / "a.txt")
        + ": line 1: bad YOLO line .*: class id "
        + re.escape(repr(class_id))
        + " is not a whole number",
    ):
        read_annotations(tmp_path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "train: [images/train\nnames: [Tree]\n",
            r": malformed YAML: expected ',' or '\]', but got ':' at line 2, column 6",
        ),
        ("train: images/train\n", r" has no 'names'"),
        (
            "train: images/train\nnames: {0: Tree, 2: Dead}\n",
            r": 'names' must be a list of class names or a mapping",
        ),
        ("names: [Tree]\n", r": names none of 'train', 'val', 'test'"),
        ("train: images/nowhere\nnames: [Tree]\n", r": train folder .*images/nowhere does not exist"),
    ],
)
def test_yolo_bad_data_yaml_names_file_and_problem(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    path.write_text(yaml_text)
    with pytest.raises(GenfusionError, match=at(path) + message):
        read_annotations(tmp_path)


def test_yolo_image_without_label_file(tmp_path: Path) -> None:
    yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None})
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "images" / "train" / "b.png") + ": image has no label file;"
        " add an empty " + at(tmp_path / "labels" / "train" / "b.txt") + " to mark an image with no objects",
    ):
        read_annotations(tmp_path / "data.yaml")


def test_yolo_label_file_without_its_image(tmp_path: Path) -> None:
    yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "labels" / "train" / "classes.txt").write_text("Tree\n")  # LabelImg's class list: not a label
    (tmp_path / "labels" / "train" / "d.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(
        GenfusionError,
        match=at(tmp_path / "labels" / "train" / "d.txt") + ": label file without its"
        " image: looked for " + at(tmp_path / "images" / "train" / "d") + r"\.\*",
    ):
        read_annotations(tmp_path)


def test_yolo_duplicate_image_names_across_splits(tmp_path: Path) -> None:
    yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    png(tmp_path / "images" / "val" / "a.png")
    (tmp_path / "labels" / "val").mkdir()
    (tmp_path / "labels" / "val" / "a.txt").write_text("")
    (tmp_path / "data.yaml").write_text("train: images/train\nval: [images/val]\nnames: {0: Tree}\n")
    with pytest.raises(
        GenfusionError, match=r"duplicate image name 'a': .*images/train/a\.png and .*images/val/a\.png"
    ):
        read_annotations(tmp_path)


# --- Label Studio ----------------------------------------------------------------------


def test_label_studio_latest_annotation_wins_and_cancelled_ones_are_skipped(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        png(tmp_path / f"{name}.png")
    old, new, cancelled = Box("Tree", 2, 1, 4, 3), Box("Dead", 10, 5, 12, 9), Box("Tree", 0, 0, 20, 10)
    tasks = [
        ls_task(
            1,
            "a.png",
            ls_annotation(5, [ls_result(old, (20, 10))], "2024-03-01T10:00:00.000000Z"),
            ls_annotation(4, [ls_result(new, (20, 10))], "2024-03-02T09:00:00.000000Z"),
            ls_annotation(6, [ls_result(cancelled, (20, 10))], "2024-03-03T09:00:00.000000Z", cancelled=True),
        ),
        # No timestamps: the highest id is the latest.
        ls_task(
            2,
            "b.png",
            ls_annotation(1, [ls_result(old, (20, 10))]),
            ls_annotation(2, [ls_result(new, (20, 10))]),
        ),
        ls_task(3, "c.png", ls_annotation(1, [ls_result(old, (20, 10))], cancelled=True)),
        ls_task(4, "missing.png"),
    ]
    items = read_annotations(write_json(tmp_path / "export.json", tasks))
    assert [item.image.name for item in items] == ["a.png", "b.png"]
    for item in items:
        (box,) = item.boxes
        assert box.label == "Dead"
        assert [box.x0, box.y0, box.x1, box.y1] == pytest.approx([10, 5, 12, 9])
        assert item.size == (20, 10)


def test_label_studio_rotated_rectangle_gives_the_enclosing_box(tmp_path: Path) -> None:
    png(tmp_path / "a.png", (200, 100))
    # 40 x 10 px at (50, 20), turned 90 degrees clockwise about (50, 20): it now hangs
    # down from that corner, 10 px to its left: x 40..50, y 20..60.
    turned = {
        "type": "rectanglelabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": 25, "y": 20, "width": 20, "height": 10, "rotation": 90, "rectanglelabels": ["Tree"]},
    }
    # 30 degrees: corners (0,0), (w cos, w sin), (w cos - h sin, w sin + h cos), (-h sin, h cos)
    # from (50, 20).
    tilted = {**turned, "value": {**turned["value"], "rotation": 30}}
    # Results that are neither rectangles nor polygons (a per-image choice here) hold no object.
    other = {"type": "choices", "value": {"choices": ["sunny"]}}
    write_json(tmp_path / "export.json", [ls_task(1, "a.png", ls_annotation(1, [turned, tilted, other]))])
    (item,) = read_annotations(tmp_path)
    assert len(item.boxes) == 2
    assert [item.boxes[0].x0, item.boxes[0].y0, item.boxes[0].x1, item.boxes[0].y1] == pytest.approx(
        [40, 20, 50, 60]
    )
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    expected = [50 - 10 * s, 20, 50 + 40 * c, 20 + 40 * s + 10 * c]
    assert [item.boxes[1].x0, item.boxes[1].y0, item.boxes[1].x1, item.boxes[1].y1] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("/data/local-files/?d=other/dir/a%20b.png", "a b.png"),  # decoded; basename fallback
        ("http://localhost:8080/data/local-files/?d=imgs/a%20b.png", "imgs/a b.png"),
        ("https://ls.example.org/data/upload/12/0badf00d-a b.png", "a b.png"),
        ("imgs/a b.png", "imgs/a b.png"),
    ],
)
def test_label_studio_image_paths_resolve_under_the_export_folder(
    tmp_path: Path, value: str, found: str
) -> None:
    png(tmp_path / "a b.png")
    png(tmp_path / "imgs" / "a b.png")
    box = ls_result(Box("Tree", 1, 1, 5, 5), (20, 10))
    write_json(tmp_path / "export.json", [ls_task(1, value, ls_annotation(1, [box]))])
    (item,) = read_annotations(tmp_path)
    assert item.image == tmp_path / found


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("../a.png", "climbs out with '..'"),
        ("/data/local-files/?d=../../etc/a.png", "climbs out with '..'"),
        ("/data/upload/1/../../a.png", "climbs out with '..'"),
        ("/etc/a.png", "is an absolute path"),
        ("/data/local-files/?d=/etc/a.png", "is an absolute path"),
        ("C:\\data\\a.png", "is an absolute path"),
        ("https://example.com/a.png", "is a URL on another host"),
        ("s3://bucket/a.png", "is a s3: URL"),
    ],
)
def test_label_studio_refuses_images_outside_the_export_folder(
    tmp_path: Path, value: str, problem: str
) -> None:
    png(tmp_path / "a.png")
    path = write_json(tmp_path / "export.json", [ls_task(7, value, ls_annotation(1, []))])
    with pytest.raises(
        GenfusionError,
        match=at(path)
        + ": task 7: image "
        + re.escape(repr(value))
        + " "
        + re.escape(problem)
        + ".*refusing it",
    ):
        read_annotations(path)


def test_label_studio_image_file_missing(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "export.json", [ls_task(7, "/data/upload/3/8c1a2b3c-x.png", ls_annotation(1, []))]
    )
    with pytest.raises(
        GenfusionError,
        match=at(path)
        + ": task 7: label file without its image: looked for "
        + at(tmp_path / "8c1a2b3c-x.png")
        + " or "
        + at(tmp_path / "x.png"),
    ):
        read_annotations(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["value"].pop("width"), r"task 7: annotation 1: result 0: value has no 'width'"),
        (
            lambda r: r["value"].update(x="left"),
            r"task 7: annotation 1: result 0: value\.x is not a number: 'left'",
        ),
        (lambda r: r.pop("original_height"), r"task 7: annotation 1: result 0 has no 'original_height'"),
        (
            lambda r: r["value"].update(rectanglelabels=[]),
            r"task 7: annotation 1: result 0: value\.rectanglelabels is empty",
        ),
    ],
)
def test_label_studio_bad_result_names_task_and_problem(tmp_path: Path, change, message: str) -> None:
    png(tmp_path / "a.png")
    result = ls_result(Box("Tree", 1, 1, 5, 5), (20, 10))
    change(result)
    path = write_json(tmp_path / "export.json", [ls_task(7, "a.png", ls_annotation(1, [result]))])
    with pytest.raises(GenfusionError, match=at(path) + ": " + message):
        read_annotations(path)


def test_label_studio_task_without_data_image_or_annotations(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "export.json", [{"id": 7, "data": {"img": "a.png"}, "annotations": [{"id": 1}]}]
    )
    with pytest.raises(GenfusionError, match=at(path) + ": task 7: data has no 'image'"):
        read_annotations(path)
    write_json(path, [{"id": 8, "image": "a.png", "label": []}])  # a JSON-MIN export
    with pytest.raises(GenfusionError, match=at(path) + ": task 8 has no 'annotations'"):
        read_annotations(path)


def test_label_studio_duplicate_tasks_for_one_image(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    result = ls_result(Box("Tree", 1, 1, 5, 5), (20, 10))
    tasks = [
        ls_task(1, "a.png", ls_annotation(1, [result])),
        ls_task(2, "/data/local-files/?d=a.png", ls_annotation(1, [result])),
    ]
    path = write_json(tmp_path / "export.json", tasks)
    with pytest.raises(
        GenfusionError, match=at(tmp_path / "a.png") + ": image is annotated twice, in " + at(path)
    ):
        read_annotations(path)


# --- every read stays inside the source folder ----------------------------------------------

LEADS = r"( -> \S+)?"  # a path the message shows leads to its resolved form when that differs


def outside(source: Path) -> str:
    """The end of the message refusing a path that resolves outside `source`."""
    return " resolves outside the source folder " + at(source) + "; DVC versions only that folder, so copy"


def relink(path: Path, target: Path) -> None:
    """Move `path` to `target` and leave a link to it in its place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    path.symlink_to(target)


def one_image_source(source: Path, fmt: str) -> None:
    """One 20 x 10 image a.png with one box, in `fmt` (VOC in a subfolder, sub/)."""
    box = Box("Tree", 1, 1, 5, 5)
    if fmt == "yolo":
        yolo_dataset(source, {"a": "0 0.5 0.5 0.2 0.2\n"})
    elif fmt == "voc":
        png(source / "sub" / "a.png")
        (source / "sub" / "a.xml").write_text(voc_xml("a.png", TREE))
    elif fmt == "coco":
        png(source / "a.png")
        write_json(source / "x.json", coco([{"image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}]))
    else:
        png(source / "a.png")
        tasks = [ls_task(1, "a.png", ls_annotation(1, [ls_result(box, (20, 10))]))]
        write_json(source / "export.json", tasks)


@pytest.mark.parametrize(
    ("fmt", "linked"),
    [
        ("voc", "sub/a.png"),
        ("voc", "sub/a.xml"),
        ("voc", "sub"),
        ("yolo", "images/train/a.png"),
        ("yolo", "labels/train/a.txt"),
        ("yolo", "images/train"),
        ("yolo", "labels/train"),
        ("yolo", "data.yaml"),
        ("coco", "a.png"),
        ("coco", "x.json"),
        ("label_studio", "a.png"),
        ("label_studio", "export.json"),
    ],
)
def test_a_link_leading_out_of_the_source_is_refused(tmp_path: Path, fmt: str, linked: str) -> None:
    source, other = tmp_path / "source", tmp_path / "other"
    one_image_source(source, fmt)
    relink(source / linked, other / linked)
    # A linked folder is refused as a whole, or at the first file read through it.
    leads = at(source / linked) + r"\S* -> " + at((other / linked).resolve()) + r"\S*"
    with pytest.raises(GenfusionError, match=leads + outside(source)):
        read_annotations(source)


@pytest.mark.parametrize("linked", ["images/train/a.png", "labels/train/a.txt", "images/train", "data.yaml"])
def test_a_link_staying_inside_the_source_is_read(tmp_path: Path, linked: str) -> None:
    one_image_source(tmp_path, "yolo")
    relink(tmp_path / linked, tmp_path / "store" / linked)
    (item,) = read_annotations(tmp_path)
    assert item.image == tmp_path / "images" / "train" / "a.png"
    assert item.boxes == (Box("Tree", 8, 4, 12, 6),)


@pytest.mark.parametrize(
    "data",
    [
        {"train": "{other}/images/train"},
        {"path": "{other}", "train": "images/train"},
        {"train": "../other/images/train"},
    ],
)
def test_yolo_data_yaml_folder_outside_the_source_is_refused(tmp_path: Path, data: dict) -> None:
    other = tmp_path / "other"
    one_image_source(other, "yolo")  # a whole dataset the yaml could borrow
    source = tmp_path / "source"
    source.mkdir()
    data = {key: value.format(other=other) for key, value in data.items()}
    path = yolo_dataset(source, {}, data | {"names": ["Tree"]})
    folder = source / data.get("path", "") / data["train"]
    with pytest.raises(GenfusionError, match=at(path) + ": train: " + at(folder) + LEADS + outside(source)):
        read_annotations(source)


def test_yolo_data_yaml_naming_a_system_folder_is_refused_without_walking_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = yolo_dataset(tmp_path, {}, {"train": "/etc", "names": ["Tree"]})
    walked = []
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: walked.append(self) or rglob(self, pattern))
    with pytest.raises(GenfusionError, match=at(path) + ": train: /etc" + LEADS + outside(tmp_path)):
        read_annotations(path)
    assert walked == []


@pytest.mark.parametrize("file_name", ["{other}/a.png", "../other/a.png", "/etc/passwd"])
def test_coco_file_name_outside_the_source_is_refused(tmp_path: Path, file_name: str) -> None:
    png(tmp_path / "other" / "a.png")
    source = tmp_path / "source"
    file_name = file_name.format(other=tmp_path / "other")
    images = [{"id": 1, "file_name": file_name}]
    path = write_json(
        source / "x.json", coco([{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}], images)
    )
    with pytest.raises(
        GenfusionError, match=at(path) + r": images\[0\]: " + at(source / file_name) + LEADS + outside(source)
    ):
        read_annotations(path)


def test_seeds_in_a_dvc_cache_of_links_are_read(
    neon: Path, voc_items: list[LabelledImage], tmp_path: Path
) -> None:
    """With DVC's `cache.type: symlink`, `dvc add` turns every seed file into a link into the
    project's DVC cache: versioned content, read like the folder's own files."""
    from project import run

    repo = tmp_path / "project"
    shutil.copytree(neon, repo / "seeds")
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "cache.type", "symlink")
    run(repo, "dvc", "add", "-q", "seeds")
    linked = repo / "seeds" / voc_items[0].image.name
    assert linked.is_symlink() and linked.resolve().is_relative_to(repo / ".dvc" / "cache")
    read = read_annotations(repo / "seeds")
    assert [(item.image.name, item.boxes) for item in read] == [
        (item.image.name, item.boxes) for item in voc_items
    ]
