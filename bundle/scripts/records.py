"""Which slices a run grades or trains on: the datalist file, the DICOM tree or image folder, or the demo data,
resolved to records ``{"image", "label", "patient_id", ...}``, each slice checked to load before the run starts.

`run training` and `run evaluating` call :func:`resolve_datalist`; `run inference` calls
:func:`inference_records`. A slice that cannot be read is listed in a skipped-files CSV, never fatal alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRED_RECORD_KEYS = ("image", "label", "patient_id")


def _with_image_path(records: list[dict]) -> list[dict]:
    """Keep the source path beside `image`, which LoadImaged replaces by the pixels, for the reports."""
    return [{**record, "image_path": str(record["image"])} for record in records]


def load_datalist(path: str | Path) -> list[dict]:
    """Read a datalist JSON: a list of records, or MONAI's ``{"training": [...]}`` form."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    if isinstance(content, Mapping):
        content = content.get("training", content.get("data"))
    if not isinstance(content, list) or not content:
        raise ValueError(f"datalist {path} must hold a non-empty list of records (or {{'training': [...]}})")
    for i, record in enumerate(content):
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"datalist {path}: record {i} lacks {missing}; each needs {list(REQUIRED_RECORD_KEYS)}")
    return content


def resolve_datalist(
    datalist: str | None = None,
    dicom_source: Mapping[str, Any] | None = None,
    *,
    image_folder: str | None = None,
    label_map: Mapping[str, int] | None = None,
    index_output: str | None = None,
    demo_cache_dir: str | None = None,
    skipped_csv: str | None = None,
) -> list[dict]:
    """The records a run trains and evaluates on, from the first source given, less any that cannot be loaded.

    1. ``datalist``: a JSON written by ``run indexing`` (or by hand);
    2. ``image_folder``: a folder-per-class PNG/JPG dataset (``scripts.image_folder``) indexed now, its
       datalist and skipped-files CSV written to ``index_output`` (default ``<image_folder>_datalist.json``);
    3. ``dicom_source``: the keyword arguments of :func:`scripts.dicom_index.write_datalist` besides the label
       map (``dataset_dir``, ``grades_csv``, the grade table's columns and aliases, ``include_post_contrast``),
       grouped once in train.yaml for `run indexing` and training alike: a DICOM tree indexed now, its datalist
       and report written to ``index_output`` (default: ``<dataset_dir>_datalist.json`` beside the tree);
    4. none of them (no ``dataset_dir`` in ``dicom_source``): the synthetic demo dataset, generated on first
       use into a cache folder and indexed with ``dicom_source``'s post-contrast switch.

    ``label_map`` (grade or class name -> index) applies to the image folder and the DICOM sources alike.

    Every slice is decoded once (:func:`scripts.transforms.split_loadable`); one that cannot be is left out,
    logged, and listed in ``skipped_csv`` (``path,reason,detail``, written whenever given), so one bad file
    never stops a run.
    """
    source = dict(dicom_source or {})
    records = _resolve_sources(datalist, source, image_folder, label_map, index_output, demo_cache_dir)
    what = f"records of {datalist or source.get('dataset_dir') or 'the demo'}"
    return _loadable(_with_image_path(records), skipped_csv, what=what)


def _loadable(records: list[dict], skipped_csv: str | Path | None, what: str, skipped: Sequence = ()) -> list[dict]:
    """``records`` less those whose image cannot be decoded; the skip rows (after ``skipped``) go to ``skipped_csv``."""
    from scripts.datalist_report import write_skipped_csv
    from scripts.transforms import split_loadable

    kept, failed = split_loadable(records)
    if skipped_csv:
        write_skipped_csv([*skipped, *failed], skipped_csv)
    if records and not kept:
        where = f"; reasons in {skipped_csv}" if skipped_csv else ""
        raise ValueError(f"none of the {len(records)} {what} can be loaded{where}")
    return kept


def _resolve_sources(
    datalist: str | None,
    source: dict[str, Any],
    image_folder: str | None,
    label_map: Mapping[str, int] | None,
    index_output: str | None,
    demo_cache_dir: str | None,
) -> list[dict]:
    from scripts.dicom_index import write_datalist

    dataset_dir, grades_csv = source.get("dataset_dir"), source.get("grades_csv")
    if datalist:
        records = load_datalist(datalist)
        logger.info("using datalist %s: %d slices", datalist, len(records))
        return records
    if image_folder:
        if dataset_dir is not None or grades_csv is not None:
            raise ValueError(
                f"--image_folder {image_folder} and a DICOM source (--dataset_dir/--grades_csv) were both given; "
                "choose one"
            )
        from scripts.image_folder import write_image_datalist

        return write_image_datalist(image_folder, index_output, label_map)
    if dataset_dir is None and grades_csv is not None:
        raise ValueError(f"grades_csv {grades_csv} was given without --dataset_dir (the DICOM tree to index)")
    if dataset_dir is not None and grades_csv is None:
        raise ValueError(
            f"--dataset_dir {dataset_dir} needs --grades_csv, the clinical table with each patient's grade"
        )
    if dataset_dir is None:
        from scripts.demo_data import ensure_demo_dataset

        demo = ensure_demo_dataset(demo_cache_dir)
        dataset_dir, grades_csv = demo["dicom_dir"], demo["grades_csv"]
        source.update(dataset_dir=dataset_dir, grades_csv=grades_csv, patient_column="Sample", grade_column="Grade")
        logger.warning("no dataset given: training on the SYNTHETIC demo dataset in %s (not patient data)", dataset_dir)
    if index_output is None:
        index_output = str(Path(dataset_dir).resolve().parent / f"{Path(dataset_dir).name}_datalist.json")
    return write_datalist(datalist=index_output, label_map=label_map, **source)


def inference_records(
    input_path: str, output_dir: str, *, include_post_contrast: bool = True, images: bool = False
) -> list[dict]:
    """T1-weighted sagittal slices of a DICOM file, series folder or tree, selected as the indexer does.

    Files left out, at selection or because their pixels cannot be decoded, are listed in
    ``output_dir/skipped.csv`` with their reasons, so a user who expected a slice to be graded can see why it
    was not; the others are graded. ``images=True`` (a model trained on an image folder) takes
    a PNG/JPG file or every image below a folder instead (``scripts.image_folder.image_inference_records``).
    """
    from scripts.dicom_index import index_dicom_tree

    if not input_path:
        raise ValueError("inference needs --input: a DICOM file, a series folder or a DICOM tree")
    if images:
        from scripts.image_folder import image_inference_records

        return image_inference_records(input_path, output_dir)
    result = index_dicom_tree(input_path, include_post_contrast=include_post_contrast)
    skipped_csv = Path(output_dir) / "skipped.csv"
    slices = _loadable(_with_image_path(result.slices), skipped_csv, f"selected slices of {input_path}", result.skipped)
    if not slices:
        raise ValueError(
            f"no T1-weighted sagittal MR slice found in {input_path} ({len(result.skipped)} files skipped; "
            f"reasons in {skipped_csv})"
        )
    logger.info(
        "inference input %s: %d slices to grade, %d files skipped", input_path, len(slices), len(result.skipped)
    )
    return slices
