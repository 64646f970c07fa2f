"""The MONAI Label app's own logic, kept free of ``monailabel`` so it is tested where MONAI Label is not installed.

MONAI Label 0.8.5 is built around segmentation: its datastore pairs every image with a label *file*, and its
bundle training task hands the bundle ``[{"image": ..., "label": <path>}]``. A glioma grade is one word per
patient, so this module answers the questions the task classes in ``infer.py`` and ``train.py`` ask:

* which grade does a datastore image carry? (:func:`parse_grade_text`, :func:`grade_of`, :func:`build_records`):
  a ``final`` label file holding the grade (``IV``, ``Grade 3``, ``GBM`` or ``{"grade": "IV"}``), the label's or
  the image's info (``{"grade": ...}``), or a REMBRANDT-style grades CSV joined on the DICOM ``PatientID``;
* which records does the bundle train on? (:func:`build_records`): the bundle's own record shape (``image``,
  ``label``, ``grade``, ``patient_id``), so its patient-level split and pair dataset work unchanged;
* which config overrides reach those records? (:func:`training_overrides`): ``records``, not
  ``train#dataset#data`` (the bundle's training dataset is a pair dataset built from ``records``);
* what does an inference answer look like? (:func:`format_prediction`).

Grades are read with the bundle's own parser (``scripts.grades``), so the datastore accepts exactly the
spellings the indexer accepts. A bare number is a WHO grade ("2" is grade II), never a class index.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from scripts.grades import DEFAULT_LABEL_MAP, GradeTable, grade_to_label

logger = logging.getLogger(__name__)

__all__ = [
    "FINAL_TAG",
    "GRADE_KEYS",
    "MODEL_FILE",
    "MODEL_NAME",
    "TRAIN_DEFAULTS",
    "TRAIN_REQUEST_KEYS",
    "build_records",
    "datastore_items",
    "dicom_patient_id",
    "format_prediction",
    "grade_of",
    "infer_request_problem",
    "parse_grade_text",
    "resolve_bundle_path",
    "select_models",
    "training_overrides",
]

MODEL_NAME = "sdl_glioma"
MODEL_FILE = "model.pt"  # the only file served: checkpoint_*.pt beside it are resume checkpoints, not models
FINAL_TAG = "final"  # MONAI Label's tag for a curated label (DefaultLabelTag.FINAL)
GRADE_KEYS = ("grade", "label", "result", "class")  # keys a JSON label file or an info dict may hold the grade in
# Defaults of a train request that leaves them out. MONAI Label's server does not merge a trainer's config() into
# the request, and BundleTrainTask would otherwise run 50 epochs and a 20 % per-slice validation split.
TRAIN_DEFAULTS = {"max_epochs": 15, "val_split": 0.15, "multi_gpu": False}
# Request keys a train request may set besides MONAI Label's own, and the bundle config key each one sets.
TRAIN_REQUEST_KEYS = {
    "batch_size": "batch_size",
    "num_workers": "num_workers",
    "learning_rate": "learning_rate",
    "cache_rate": "cache_rate",
    "val_interval": "val_interval",
    "seed": "seed",
}


class DatastoreLike(Protocol):
    """The part of MONAI Label's ``Datastore`` interface this module reads (duck-typed, so tests need no server)."""

    def list_images(self) -> list[str]: ...
    def get_image_uri(self, image_id: str) -> str: ...
    def get_image_info(self, image_id: str) -> dict[str, Any]: ...
    def get_label_by_image_id(self, image_id: str, tag: str) -> str: ...
    def get_label_uri(self, label_id: str, label_tag: str) -> str: ...
    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]: ...


def resolve_bundle_path(conf_value: str | None, app_dir: str | Path) -> Path:
    """The bundle folder the app serves: ``--conf bundle_path DIR``, else the repository's ``bundle/`` beside the app.

    Checked here, at start-up, because MONAI Label only logs a warning and serves no model when a bundle folder
    lacks ``configs/inference.yaml`` or ``models/model.pt``.
    """
    path = Path(conf_value) if conf_value else Path(app_dir).resolve().parent / "bundle"
    path = path.expanduser().resolve()
    needed = ("configs/inference.yaml", "configs/train.yaml", "configs/metadata.json")
    missing = [p for p in needed if not (path / p).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle_path {path} is not an SDL glioma bundle: missing {', '.join(missing)}")
    return path


def select_models(conf_value: str | None, available: Sequence[str] = (MODEL_NAME,)) -> list[str]:
    """Models named by ``--conf models a,b`` (``all`` or nothing: every model); an unknown name is an error."""
    if not conf_value or conf_value.strip().lower() == "all":
        return list(available)
    names = [n.strip() for n in conf_value.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown} in --conf models; available: {', '.join(available)} or all")
    return names


def infer_request_problem(
    request: Mapping[str, Any], models: Iterable[str], datastore: DatastoreLike
) -> tuple[int, str] | None:
    """``(HTTP status, message)`` for an infer request the app cannot answer, or None when it can.

    MONAI Label 0.8.5 answers a request for an unknown model or image id with a bare HTTP 500: an image id
    that is not in the datastore becomes an empty path, and the server then reads its own working folder as a
    DICOM series. Checked before the request reaches MONAI Label, so the client learns what to fix (404: no
    such model or image; 400: a model file other than ``model.pt``).
    """
    models = list(models)
    model = request.get("model")
    if model not in models:
        return 404, f"no model {model!r} here; this app serves: {', '.join(models) or 'none'}"
    filename = request.get("model_filename")
    if filename not in (None, "", MODEL_FILE):
        return 400, f"model_filename {filename!r} cannot be served: only {MODEL_FILE} is a model"
    image = request.get("image")
    if not isinstance(image, str):
        return None  # an image already loaded by the caller (MONAI Label's own API)
    if not image:
        return 400, "no image given: pass ?image=<image id of the datastore>"
    if Path(image).is_file() or image in datastore.list_images():
        return None
    return 404, f"no image {image!r} in the datastore (and no such file)"


def parse_grade_text(text: str) -> str:
    """The raw grade written in a label file: a JSON object's ``grade``/``label``/``result``/``class``, a JSON
    string or number, or else the first non-empty line of plain text (``IV``, ``Grade 3``, ``GBM``)."""
    stripped = text.strip()
    if not stripped:
        return ""
    try:
        content = json.loads(stripped)
    except ValueError:
        return stripped.splitlines()[0].strip()
    if isinstance(content, Mapping):
        for key in GRADE_KEYS:
            if content.get(key) not in (None, ""):
                return str(content[key]).strip()
        return ""
    if isinstance(content, (str, int, float)) and not isinstance(content, bool):
        return str(content).strip()
    return ""


def _grade_in_info(info: Mapping[str, Any] | None) -> str:
    """Only an explicit ``grade`` key: ``label`` and ``name`` in an info dict are MONAI Label's own fields."""
    if info and info.get("grade") not in (None, ""):
        return str(info["grade"]).strip()
    return ""


def dicom_patient_id(path: str | Path) -> str:
    """``PatientID`` of a DICOM file, read without pixels; "" when the file has none or is not DICOM.

    The patient is what the bundle splits on (all slices of a patient on one side), so it is taken from the
    header, not guessed from the file name.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # not DICOM, truncated, unreadable: the caller falls back to the image id
        return ""
    return str(ds.get("PatientID", "") or "").strip()


def datastore_items(datastore: DatastoreLike, label_tag: str = FINAL_TAG) -> list[dict[str, Any]]:
    """Everything the datastore knows about each image: id, path, info, and its ``label_tag`` label file and info.

    Every image is listed, labelled or not: an image without a label file may still get its grade from the
    grades CSV.
    """
    items = []
    for image_id in sorted(datastore.list_images()):
        label_id = datastore.get_label_by_image_id(image_id, label_tag)
        items.append(
            {
                "image_id": image_id,
                "image": datastore.get_image_uri(image_id),
                "info": dict(datastore.get_image_info(image_id) or {}),
                "label": datastore.get_label_uri(label_id, label_tag) if label_id else "",
                "label_info": dict(datastore.get_label_info(label_id, label_tag) or {}) if label_id else {},
            }
        )
    return items


def grade_of(
    item: Mapping[str, Any], patient_id: str, grades: GradeTable | None = None
) -> tuple[str, str] | tuple[None, str]:
    """``(raw grade, source)`` of one datastore item, or ``(None, why not)``.

    Order: the label file (what an annotator saved last), the label's info, the image's info, then the grades
    CSV by patient. A label file that exists but holds no grade is an error, not a silent fall-through: the
    annotator meant something.
    """
    label_path = item.get("label")
    if label_path:
        try:
            raw = parse_grade_text(Path(label_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"label file {label_path} is not a readable text file ({type(exc).__name__})"
        if not raw:
            return None, f"label file {label_path} holds no grade"
        return raw, "label file"
    for source, info in (("label info", item.get("label_info")), ("image info", item.get("info"))):
        raw = _grade_in_info(info)
        if raw:
            return raw, source
    if grades is not None:
        found = grades.lookup(patient_id)
        if found is not None:
            return found.grade, "grades csv"
        return None, f"no label and patient {patient_id!r}: {grades.problem(patient_id) or 'no grade'}"
    return None, "no label file, no grade in the image info and no grades CSV"


def build_records(
    items: Iterable[Mapping[str, Any]],
    *,
    label_map: Mapping[str, int] | None = None,
    grade_aliases: Mapping[str, str] | None = None,
    grades: GradeTable | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Datastore items -> ``(records, skipped)`` in the bundle's datalist shape.

    Each record has ``image``, ``image_path``, ``label`` (class index through ``label_map``), ``grade``,
    ``patient_id`` (image info ``patient_id``, else the DICOM ``PatientID``, else the image id) and where its
    grade came from. Items without a usable grade are returned in ``skipped`` with the reason, for the log.
    """
    label_map = dict(DEFAULT_LABEL_MAP if label_map is None else label_map)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for item in items:
        image_id = str(item.get("image_id") or Path(str(item["image"])).stem)
        info = item.get("info") or {}
        patient_id = str(info.get("patient_id") or "").strip() or dicom_patient_id(item["image"]) or image_id
        raw, source = grade_of(item, patient_id, grades)
        if raw is None:
            skipped.append({"image_id": image_id, "reason": source})
            continue
        grade, label, problem = grade_to_label(raw, label_map, grade_aliases)
        if grade is None or label is None:
            skipped.append({"image_id": image_id, "reason": f"{problem} (from the {source})"})
            continue
        image = str(item["image"])
        records.append(
            {
                "image": image,
                "image_path": image,
                "label": label,
                "grade": grade,
                "patient_id": patient_id,
                "image_id": image_id,
                "grade_source": source,
            }
        )
    return records, skipped


def training_overrides(
    overrides: MutableMapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    val_split: float | None = None,
    request: Mapping[str, Any] | None = None,
) -> MutableMapping[str, Any]:
    """Turn MONAI Label's bundle overrides into ones that reach this bundle's records; changes ``overrides`` in place.

    ``BundleTrainTask`` sets ``train#dataset#data`` (and ``validate#dataset#data``) to its own image/label
    lists. Here the training dataset is ``GroupDataset.from_records(records=$@splits['train'])``, which has no
    ``data`` argument, and the validation set is a split of the same records. So both are dropped and
    ``records`` is set instead: the bundle then splits those records by patient, stratified by grade, as in
    ``run training``. ``val_split`` (MONAI Label's request option) becomes ``val_fraction``; ``test_fraction``
    is 0 because a labelling loop keeps no test patients aside. Whitelisted request keys (batch size, workers,
    learning rate, ...) become the bundle settings of the same meaning.
    """
    overrides.pop("train#dataset#data", None)
    overrides.pop("validate#dataset#data", None)
    overrides["records"] = [dict(r) for r in records]
    overrides["overwrite"] = True  # a train request replaces the served model.pt by design
    overrides["test_fraction"] = 0.0
    if val_split is not None and val_split >= 0:  # MONAI Label's -1: keep the bundle's own val_fraction
        if not 0 < float(val_split) < 1:
            raise ValueError(
                f"val_split must be in (0, 1), or -1 for the bundle's default, got {val_split}: the bundle keeps "
                "the model of the best validation epoch, so it needs validation patients"
            )
        overrides["val_fraction"] = float(val_split)
    for key, config_key in TRAIN_REQUEST_KEYS.items():
        if request and request.get(key) not in (None, ""):
            overrides[config_key] = request[key]
    return overrides


def format_prediction(probabilities: Sequence[float] | Any, class_names: Sequence[str]) -> dict[str, Any]:
    """The JSON an inference request returns: MONAI Label's ``prediction`` list plus the grade in plain words.

    ``prediction`` has MONAI Label's classification shape (``[{"idx", "label", "score"}]``, what its viewers'
    classification panels read); ``grade``, ``label`` and ``probabilities`` say the same for a script.
    """
    values = probabilities.tolist() if hasattr(probabilities, "tolist") else list(probabilities)
    scores = [float(v) for v in (values[0] if values and isinstance(values[0], list) else values)]
    if len(scores) != len(class_names):
        raise ValueError(f"{len(scores)} scores for {len(class_names)} classes {list(class_names)}")
    best = max(range(len(scores)), key=scores.__getitem__)
    pairs = list(zip(class_names, scores, strict=True))
    return {
        "prediction": [{"idx": i, "label": name, "score": s} for i, (name, s) in enumerate(pairs)],
        "grade": class_names[best],
        "label": best,
        "probabilities": dict(pairs),
    }
