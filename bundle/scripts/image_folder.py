"""Folder-per-class image datasets (PNG/JPG/BMP/TIFF) as bundle records, so SDL serves as a general classifier.

Layouts (class folders may hold sub-folders; every image below a class folder belongs to that class):

* ``DIR/<class>/*.png`` -- one pool, split by ``scripts.splits`` like a DICOM datalist;
* ``DIR/Training/<class>/...`` with ``DIR/Testing/<class>/...`` (and optionally ``DIR/Validation/<class>/...``;
  names matched case-insensitively: ``train``/``training``, ``val``/``valid``/``validation``, ``test``/``testing``)
  -- the public 4-class brain tumour MRI sets ship this way. The predefined split is honoured by default
  (records carry ``split``, :func:`scripts.splits.make_splits` keeps it): the publishers' test set stays the test
  set, so figures are comparable with published ones. ``predefined_split=False`` pools the folders instead.

Records have the DICOM datalist's shape: ``image`` (absolute path), ``label``, ``grade`` (the class name: the
field holds the label's name in every datalist), ``patient_id`` and, for predefined splits, ``split``. Folder
datasets carry no patient identity, so **every image is its own pseudo-patient** (``patient_id`` = its path
relative to ``DIR`` without suffix): the patient-level split becomes an image-level split, stratified by class.
That is only honest if the publishers did not put several slices of one patient in the set; where they did, the
split leaks like the paper's slice-level split, and nothing in the files lets us tell.

Classes are the sorted class-folder names (label = position) unless a ``label_map`` is given; then folders outside
it are skipped (reported), and a class of the map without a folder is an error.

Bad input: an empty class folder, or one whose images are all unreadable, is an error naming the folder; a single
unreadable image (or a non-image file) is skipped, logged with the file and reason, and listed in the skipped CSV,
because one corrupt JPG in thousands should not stop a run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.data import ImageReader, PILReader
from monai.utils import ensure_tuple
from PIL import Image

from scripts.datalist_report import write_skipped_csv

__all__ = [
    "GREY_MODES",
    "IMAGE_SUFFIXES",
    "SPLIT_FOLDERS",
    "GreyImageOrDicomReader",
    "ImageFolderIndex",
    "folder_label_map",
    "image_inference_records",
    "index_image_folder",
    "is_image_file",
    "to_grey",
    "write_image_datalist",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Folder names (lower case) of a predefined split -> the split name the bundle uses.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
# PIL modes that already are one grey channel; 16-bit and float images are kept at full depth.
GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def is_image_file(path: str | Path) -> bool:
    """True for the suffixes read by PIL here (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_grey(image: Image.Image) -> Image.Image:
    """One grey channel: MR exported as RGB(A)/palette/LA/1-bit is converted with PIL's luma ("L");
    grey images keep their mode so 16-bit PNGs are not cut to 8 bits. ``PILReader``'s ``converter``."""
    return image if image.mode in GREY_MODES else image.convert("L")


class GreyImageOrDicomReader(ImageReader):
    """Choose per file: PNG/JPG/BMP/TIFF through MONAI's ``PILReader`` (grey, ``reverse_indexing=True`` so arrays
    are ``(x=width, y=height)`` like DICOM), everything else through ``DicomSliceReader``.

    A datalist of image files then loads without telling the config which kind of file it holds, while DICOM
    files with any suffix (or none) still go to the DICOM reader exactly as before.
    """

    def __init__(self) -> None:
        super().__init__()
        from scripts.dicom_reader import DicomSliceReader

        self.dicom = DicomSliceReader()
        self.pil = PILReader(converter=to_grey)

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return True

    def _pick(self, data: Sequence[str | Path] | str | Path) -> ImageReader:
        return self.pil if all(is_image_file(n) for n in ensure_tuple(data)) else self.dicom

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> tuple[ImageReader, Any]:
        reader = self._pick(data)
        return reader, reader.read(data, **kwargs)

    def get_data(self, img: tuple[ImageReader, Any]) -> tuple[Any, dict]:
        reader, obj = img
        return reader.get_data(obj)


@dataclass
class ImageFolderIndex:
    """What indexing a folder found: records, the label map used, and every file left out with its reason."""

    records: list[dict]
    label_map: dict[str, int]
    skipped: list[dict] = field(default_factory=list)
    predefined_split: bool = False


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _layout(root: Path, predefined_split: bool = True) -> dict[str, Path]:
    """``{split name or "": folder of class folders}``; ``""`` when there is no predefined split."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    subdirs = _subdirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    if not split_dirs:
        return {"": root}
    others = [d.name for d in subdirs if d not in split_dirs]
    if others:
        raise ValueError(
            f"image folder {root} mixes split folders {[d.name for d in split_dirs]} with other folders {others}: "
            "use either DIR/<class>/ or DIR/Training|Testing/<class>/"
        )
    parts: dict[str, Path] = {}
    for d in split_dirs:
        name = SPLIT_FOLDERS[d.name.lower()]
        if name in parts:
            raise ValueError(f"image folder {root} has two folders for the {name} split: {parts[name].name}, {d.name}")
        parts[name] = d
    if "train" not in parts:
        raise ValueError(f"image folder {root} has split folders {sorted(d.name for d in split_dirs)} but no Training")
    return parts if predefined_split else {f"pooled:{k}": v for k, v in parts.items()}


def _class_folders(root: Path, predefined_split: bool = True) -> dict[str, dict[str, Path]]:
    """``{split: {class name: folder}}``; a class present in a test/validation folder only is an error."""
    layout = _layout(root, predefined_split)
    parts = {split: {d.name: d for d in _subdirs(folder)} for split, folder in layout.items()}
    train_key = next(k for k in parts if k in ("", "train", "pooled:train"))
    if not parts[train_key]:
        raise ValueError(f"{layout[train_key]} holds no class folder (expected <class>/*.png below it)")
    for split, classes in parts.items():
        extra = sorted(set(classes) - set(parts[train_key]))
        if extra:
            raise ValueError(f"class folders {extra} of {layout[split]} have no folder in {layout[train_key]}")
    return parts


def folder_label_map(image_folder: str | Path, predefined_split: bool = True) -> dict[str, int]:
    """``{class folder name: index}`` in sorted name order, e.g. glioma 0, meningioma 1, notumor 2, pituitary 3."""
    parts = _class_folders(Path(image_folder), predefined_split)
    names = sorted({name for classes in parts.values() for name in classes})
    return {name: i for i, name in enumerate(names)}


def _check_label_map(label_map: Mapping[str, Any]) -> dict[str, int]:
    checked = {str(k): int(v) for k, v in dict(label_map).items()}
    if sorted(checked.values()) != list(range(len(checked))):
        raise ValueError(f"label_map values must be 0..{len(checked) - 1}, each once (class indices); got {checked}")
    return checked


def _readable(path: Path) -> str | None:
    """None if PIL decodes the whole image, else the reason (truncated JPGs fail only on a full decode)."""
    try:
        with Image.open(path) as image:
            image.load()
            to_grey(image)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def index_image_folder(
    image_folder: str | Path,
    label_map: Mapping[str, int] | None = None,
    *,
    predefined_split: bool = True,
    verify: bool = True,
) -> ImageFolderIndex:
    """Index a folder-per-class dataset into records (see module doc); ``verify`` decodes every image once so an
    unreadable file is skipped here with its reason instead of failing a training run hours later."""
    root = Path(image_folder)
    parts = _class_folders(root, predefined_split)
    label_map = _check_label_map(label_map) if label_map else folder_label_map(root, predefined_split)
    found = {name for classes in parts.values() for name in classes}
    missing = sorted(set(label_map) - found)
    if missing:
        raise ValueError(f"label_map classes {missing} have no class folder in {root} (folders: {sorted(found)})")
    records: list[dict] = []
    skipped: list[dict] = []
    for split, classes in parts.items():
        for name, folder in sorted(classes.items()):
            if name not in label_map:
                skipped.append({"path": str(folder), "reason": f"class folder {name!r} is not in label_map"})
                logger.warning("skipping %s: class folder %r is not in label_map %s", folder, name, label_map)
                continue
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            kept = 0
            for path in files:
                reason = None if is_image_file(path) else f"not an image file (suffix not in {IMAGE_SUFFIXES})"
                if reason is None and verify:
                    reason = _readable(path)
                if reason is not None:
                    skipped.append({"path": str(path), "reason": reason})
                    if is_image_file(path):
                        logger.warning("skipping %s: %s", path, reason)
                    continue
                record = {
                    "image": str(path.resolve()),
                    "label": label_map[name],
                    "grade": name,
                    "patient_id": path.relative_to(root).with_suffix("").as_posix(),
                }
                if split in ("train", "validation", "test"):
                    record["split"] = split
                records.append(record)
                kept += 1
            if kept == 0:
                bad = [s for s in skipped if Path(s["path"]).is_relative_to(folder)]
                detail = f"; {len(bad)} files skipped, e.g. {bad[0]['path']}: {bad[0]['reason']}" if bad else ""
                raise ValueError(f"class folder {folder} holds no readable image ({', '.join(IMAGE_SUFFIXES)}){detail}")
    counts = Counter((r.get("split", "all"), r["grade"]) for r in records)
    logger.info(
        "image folder %s: %d images (%s), %d files skipped; each image is its own pseudo-patient",
        root,
        len(records),
        ", ".join(f"{s}/{g}: {n}" for (s, g), n in sorted(counts.items())),
        len(skipped),
    )
    has_split = any("split" in r for r in records)
    return ImageFolderIndex(records=records, label_map=label_map, skipped=skipped, predefined_split=has_split)


def write_image_datalist(
    image_folder: str | Path,
    output: str | Path | None = None,
    label_map: Mapping[str, int] | None = None,
    *,
    predefined_split: bool = True,
    verify: bool = True,
) -> list[dict]:
    """Index the folder and write the datalist JSON (default ``<DIR>_datalist.json`` beside ``DIR``, as the DICOM
    indexer does) and ``<stem>_skipped.csv``, so a run can be repeated with ``--datalist`` and skipped files read."""
    index = index_image_folder(image_folder, label_map, predefined_split=predefined_split, verify=verify)
    root = Path(image_folder).resolve()
    output = Path(output) if output else root.parent / f"{root.name}_datalist.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(index.records, indent=1))
    skipped_csv = output.with_name(f"{output.stem}_skipped.csv")
    write_skipped_csv(index.skipped, skipped_csv)
    logger.info("wrote %s (%d images) and %s", output, len(index.records), skipped_csv)
    return index.records


def image_inference_records(input_path: str | Path, output_dir: str | Path) -> list[dict]:
    """Images to grade: one image file, or every image below a folder (any layout; class folders are ignored).

    Each image is its own ``patient_id`` and ``series_uid`` (its path relative to the input), so the inference
    report's per-series table lists one row per image. Unreadable and non-image files go to
    ``output_dir/skipped.csv`` with their reasons.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"inference input {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    base = path.parent if path.is_file() else path
    records, skipped = [], []
    for file in files:
        reason = None if is_image_file(file) else f"not an image file (suffix not in {IMAGE_SUFFIXES})"
        reason = reason or _readable(file)
        if reason:
            skipped.append({"path": str(file), "reason": reason})
            continue
        pseudo_id = file.relative_to(base).with_suffix("").as_posix()
        records.append({"image": str(file), "image_path": str(file), "patient_id": pseudo_id, "series_uid": pseudo_id})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_skipped_csv(skipped, out / "skipped.csv")
    if not records:
        raise ValueError(f"no readable image ({', '.join(IMAGE_SUFFIXES)}) in {path}; see {out / 'skipped.csv'}")
    logger.info("inference input %s: %d images, %d files skipped", path, len(records), len(skipped))
    return records
