"""Pascal VOC: a folder of .xml files, each naming its image, with <object> boxes."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path, PurePosixPath

from genfusion.boxes import Box, LabelledImage
from genfusion.errors import GenfusionError
from genfusion.formats._common import (
    ANY_IMAGE,
    IMAGE_EXTENSIONS,
    _files,
    _find_image,
    _no_label_error,
    _number,
    _size,
)


def read(source: Path) -> list[LabelledImage]:
    if not source.is_dir():
        raise GenfusionError(f"{source}: a Pascal VOC source must be a folder of .xml files")
    files = _files(source, (".xml", *IMAGE_EXTENSIONS), source)
    images = [p for p in files if p.suffix.lower() != ".xml"]
    beside: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    by_name: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        beside[image.parent, image.stem].append(image)
        by_name[image.name].append(image)
    items = [_read_voc_file(xml, beside, by_name, source) for xml in files if xml.suffix.lower() == ".xml"]
    unlabelled = sorted(set(images) - {item.image for item in items})
    if unlabelled:
        raise _no_label_error(unlabelled, "add a .xml holding an <annotation> with no <object>")
    return items


def _read_voc_file(
    xml: Path, beside: dict[tuple[Path, str], list[Path]], by_name: dict[str, list[Path]], source: Path
) -> LabelledImage:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as err:
        raise GenfusionError(f"{xml}: malformed XML: {err}") from err
    if root.tag != "annotation":
        raise GenfusionError(
            f"{xml}: not a Pascal VOC annotation: the root element is <{root.tag}>, not <annotation>"
        )
    named = PurePosixPath((root.findtext("filename") or "").strip().replace("\\", "/")).name
    candidates = [xml.parent / named] if named else []
    # Tools keep the original <filename> (a .tif) after the image was converted (to a .png):
    # then the image named like the xml beside it is the one; the VOC devkit layout keeps
    # images in a sibling folder, so a single image of that name anywhere below also counts.
    candidates += beside.get((xml.parent, xml.stem), [])
    candidates += by_name[named] if named and len(by_name[named]) == 1 else []
    image = _find_image(candidates, str(xml), source, also=f"an image {xml.parent / xml.stem}{ANY_IMAGE}")
    size_element = root.find("size")
    size = None
    if size_element is not None:
        size = _size(size_element.findtext("width"), size_element.findtext("height"), f"{xml}: <size>")
    boxes = []
    for index, obj in enumerate(root.findall("object"), 1):
        where = f"{xml}: object {index}"
        label = _xml_text(obj, "name", where)
        bndbox = _xml_child(obj, "bndbox", where)
        x0, y0, x1, y1 = (
            _number(_xml_text(bndbox, tag, where), f"{where}: <{tag}>")
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        boxes.append(Box(label, x0, y0, x1, y1))
    return LabelledImage(image, tuple(boxes), size, xml)


def _xml_child(element: ET.Element, tag: str, where: str) -> ET.Element:
    child = element.find(tag)
    if child is None:
        raise GenfusionError(f"{where}: <{element.tag}> has no <{tag}>")
    return child


def _xml_text(element: ET.Element, tag: str, where: str) -> str:
    text = (_xml_child(element, tag, where).text or "").strip()
    if not text:
        raise GenfusionError(f"{where}: <{tag}> is empty")
    return text
