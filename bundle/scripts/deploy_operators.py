"""MONAI Deploy App SDK 4.x operators that grade the T1-weighted sagittal series of a DICOM study with SDL.

Used by :mod:`scripts.deploy_app`; ``bundle/docs/deploy.md`` explains the choices. In short:

* Selection: :class:`T1SagittalSeriesSelectorOperator` is the SDK's ``DICOMSeriesSelectorOperator`` with its
  ``filter`` replaced by the indexer's per-file rules (:func:`scripts.dicom_index.inspect_file`). The SDK's
  JSON rules compare series-level attributes with AND-ed equal/regex/range conditions; they cannot say
  "TI absent or below 1500 ms", "short TR and short TE, or inversion-prepared with short TE", fall back to
  the series description when ImageOrientationPatient is missing, or judge each file (truncated pixel data,
  duplicates), and their orientation test needs PatientPosition, which many REMBRANDT files lack. Reusing
  the indexer keeps deploy, ``run inference`` and training on exactly the same slices.
* Inference: :class:`SDLSliceGradingOperator`, a thin operator over the exported TorchScript (or the bundle's
  eager network). ``MonaiBundleInferenceOperator`` receives one volume per call (from
  ``DICOMSeriesToVolumeOperator``) and runs the network once on it with a batch dimension of 1, whereas SDL
  grades each 2D slice on its own (percentile scaling per slice) and averages the slices' probabilities.
* Output: :class:`GradeReportOperator` writes ``grade.json``; :class:`StudyTextSRWriterOperator` is the
  SDK's Basic Text SR writer, writing one SR per study instead of one for the first selected series.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.operators import (
    DICOMSeriesSelectorOperator,
    DICOMTextSRWriterOperator,
    EquipmentInfo,
    InferenceOperator,
    ModelInfo,
)
from monai.inferers import SimpleInferer
from monai.transforms import Compose, LoadImaged
from pydicom.uid import generate_uid

from scripts.dicom_index import first_of_each_instance, inspect_file
from scripts.dicom_reader import DicomSliceReader
from scripts.flags import as_flag
from scripts.model_settings import DEFAULTS, read_model_settings
from scripts.network import load_state_dict_file
from scripts.reports import average_by
from scripts.roi import require_whole_slice_model
from scripts.skip_reasons import REASON_UNREADABLE
from scripts.tta import FlipTTAInferer

__all__ = [
    "GRADE_JSON",
    "SELECTION_NAME",
    "GradeReportOperator",
    "GradingModel",
    "SDLSliceGradingOperator",
    "StudyTextSRWriterOperator",
    "T1SagittalSeriesSelectorOperator",
    "load_grading_model",
    "select_t1_sagittal_series",
    "study_report_text",
]

logger = logging.getLogger(__name__)

GRADE_JSON = "grade.json"
SELECTION_NAME = "T1-weighted sagittal MR"
CONFIG_NAMES = ("inference.yaml", "inference.yml", "inference.json")
DISCLAIMER = "Research use only; not a medical device, not for diagnosis."
PREDICTION_RULE = (
    "each slice: mean of the SDL branches' softmax probabilities; each series: mean of its slices' probabilities, "
    "grade = argmax"
)


# --- the model and its preprocessing ---------------------------------------------------------------------------
@dataclass
class GradingModel:
    """Everything the operators need from MODEL: network, preprocessing without loader, class names, provenance."""

    network: torch.nn.Module
    preprocessing: Compose
    class_names: list[str]
    display_names: list[str]
    include_post_contrast: bool
    device: torch.device
    source: str  # "torchscript" or "bundle"
    path: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    tta_flip: bool = False

    @property
    def model_info(self) -> ModelInfo:
        """IHE AIR model description for the SR's Contributing Equipment; the UID changes with the weights."""
        return ModelInfo(
            creator=str(self.meta.get("authors", "")),
            name="SDL glioma grading",
            version=str(self.meta.get("version", "")),
            uid=generate_uid(entropy_srcs=[self.sha256]),
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _without_loader(preprocessing: Any) -> Compose:
    """The config's ``preprocessing`` minus ``LoadImaged``, as ``MonaiBundleInferenceOperator`` strips LoadImage.

    Taking the chain from the config (not rebuilding it here) keeps image size, smoothing and ImageNet
    normalisation identical to ``run inference`` for whatever the config says.
    """
    if not isinstance(preprocessing, Compose):
        raise TypeError(f"config item 'preprocessing' must be a monai Compose, got {type(preprocessing).__name__}")
    steps = [t for t in preprocessing.transforms if not isinstance(t, LoadImaged)]
    return Compose(steps)


def _class_names(parser: ConfigParser, meta: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Class names from the config's label map (as in predictions.json) and display names from channel_def."""
    class_names = [str(c) for c in parser.get_parsed_content("class_names")]
    channel_def = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {}) or {}
    display = [str(channel_def.get(str(i), name)) for i, name in enumerate(class_names)]
    return class_names, display


def _parser(config: Mapping[str, Any], meta: Mapping[str, Any], settings: Mapping[str, Any]) -> ConfigParser:
    """The inference config with the model's own settings in place of its ``trained_settings`` reader."""
    parser = ConfigParser()
    parser.read_config(f=dict(config))
    parser.read_meta(f=dict(meta))
    if "trained_settings" in parser:  # configs older than model_settings.json hold the values themselves
        parser["trained_settings"] = dict(settings)
    return parser


def _archive_settings(network: torch.nn.Module, path: Path) -> dict[str, Any]:
    """The settings an exported network carries (``SDLNet.model_settings``), or the defaults, with a warning."""
    text = getattr(network, "model_settings", "")
    if not text:
        logger.warning("%s carries no model settings (exported before model_settings.json): using the defaults", path)
        return {**DEFAULTS, "_source": None}
    return {**json.loads(text), "_source": f"{path} (exported model)"}


def _load_torchscript(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict, dict]:
    """Load a ``ckpt_export`` archive with the metadata.json and inference.json it embeds as extra files."""
    extra = {"metadata.json": "", "inference.json": ""}
    try:
        network = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as exc:
        raise ValueError(
            f"MODEL {path} is not a TorchScript archive ({str(exc).splitlines()[0]}); pass an exported .ts or the "
            "bundle folder (configs/ and models/model.pt), not the state_dict file itself"
        ) from exc
    missing = [name for name, content in extra.items() if not content]
    if missing:
        raise ValueError(
            f"{path} lacks the extra file(s) {missing}: export it with `python -m monai.bundle ckpt_export "
            "network_def --filepath OUT.ts --ckpt_file bundle/models/model.pt --meta_file bundle/configs/metadata.json "
            "--config_file bundle/configs/inference.yaml`, which embeds both (the preprocessing settings and class "
            "names are read from them)"
        )
    return network, json.loads(extra["metadata.json"]), json.loads(extra["inference.json"])


def _load_bundle(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict, dict, Path, dict]:
    """Build ``network_def`` from the bundle's inference config and load ``models/model.pt`` into it."""
    config_file = next((path / "configs" / n for n in CONFIG_NAMES if (path / "configs" / n).is_file()), None)
    meta_file = path / "configs" / "metadata.json"
    weights = path / "models" / "model.pt"
    for needed, what in ((config_file, "configs/inference.yaml"), (meta_file, "configs/metadata.json")):
        if needed is None or not needed.is_file():
            raise FileNotFoundError(f"bundle folder {path} has no {what}")
    if not weights.is_file():
        raise FileNotFoundError(f"bundle folder {path} has no models/model.pt (train first, or pass an exported .ts)")
    config = ConfigParser.load_config_file(str(config_file))
    meta = ConfigParser.load_config_file(str(meta_file))
    settings = read_model_settings(weights)
    network = _parser(config, meta, settings).get_parsed_content("network_def")
    network.load_state_dict(load_state_dict_file(weights))  # a trainer checkpoint's weights are unwrapped too
    return network.to(device), meta, config, weights, settings


def load_grading_model(model_path: str | Path, device: torch.device | None = None) -> GradingModel:
    """Load MODEL: an exported TorchScript file (``ckpt_export``) or a bundle folder with configs/ and models/.

    Both forms read the preprocessing chain, the label map, ``include_post_contrast`` and ``tta_flip`` from the
    bundle's inference config (embedded as ``inference.json`` in the TorchScript archive), so the app selects,
    prepares and grades slices exactly as ``run inference`` does for the same model.
    """
    path = Path(model_path).expanduser().resolve()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if path.is_file():
        network, meta, config = _load_torchscript(path, device)
        source, weights, settings = "torchscript", path, _archive_settings(network, path)
    elif path.is_dir():
        network, meta, config, weights, settings = _load_bundle(path, device)
        source = "bundle"
    else:
        raise FileNotFoundError(f"MODEL not found: {path}")
    require_whole_slice_model(settings)  # a model graded on tumour regions needs masks a study does not have
    parser = _parser(config, meta, settings)
    class_names, display_names = _class_names(parser, meta)
    include_post_contrast = parser.get_parsed_content("include_post_contrast", default=True)
    preprocessing = _without_loader(parser.get_parsed_content("preprocessing"))
    tta_flip = False
    if parser.get("tta_flip") is not None:  # configs with the switch also have scripts.tta
        tta_flip = as_flag(parser.get_parsed_content("tta_flip"))
    network.eval()
    model = GradingModel(
        network=network,
        preprocessing=preprocessing,
        class_names=class_names,
        display_names=display_names,
        include_post_contrast=as_flag(include_post_contrast),
        device=device,
        source=source,
        path=str(path),
        sha256=_sha256(weights),
        meta=dict(meta),
        tta_flip=tta_flip,
    )
    logger.info(
        "model %s (%s): classes %s, preprocessing %s, left-right flip TTA %s",
        path,
        source,
        class_names,
        [type(t).__name__ for t in preprocessing.transforms],
        "on" if tta_flip else "off",
    )
    return model


# --- series selection ------------------------------------------------------------------------------------------
def _instance_number(ds: Any) -> int:
    try:
        return int(ds.get("InstanceNumber", -1))
    except (TypeError, ValueError):
        return -1


def select_t1_sagittal_series(
    dicom_study_list: Sequence[DICOMStudy], include_post_contrast: bool = True
) -> list[StudySelectedSeries]:
    """Judge every SOP instance with the indexer's rules and keep the series with at least one selected slice.

    Returns one ``StudySelectedSeries`` per study, also for studies without a T1 sagittal series (so the
    report can say why). Each ``SelectedSeries.metadata()`` holds ``"datasets"`` (the selected pydicom
    datasets, sorted by InstanceNumber then path, as the indexer sorts) and ``"records"`` (their identifiers);
    each study's metadata holds ``"skipped"`` (``{"path", "reason", "detail"}`` per left-out instance).
    """
    selected: list[StudySelectedSeries] = []
    for study in dicom_study_list:
        study_selection = StudySelectedSeries(study, metadata={"skipped": []})
        skipped = study_selection.metadata()["skipped"]
        for series in study.get_all_series():
            by_path: dict[str, Any] = {}
            for sop in series.get_sop_instances():
                ds = sop.get_native_sop_instance()
                path = str(getattr(ds, "filename", "") or "")
                if not path:
                    skipped.append({"path": "", "reason": REASON_UNREADABLE, "detail": "instance has no file path"})
                    continue
                by_path[path] = ds
            outcomes = [inspect_file(path, include_post_contrast) for path in sorted(by_path)]
            slices, left_out = first_of_each_instance(outcomes)
            skipped.extend(left_out)
            kept = [(outcome, by_path[outcome["image"]]) for outcome in slices]
            if not kept:
                continue
            kept.sort(key=lambda item: (_instance_number(item[1]), item[0]["image"]))
            metadata = {"records": [record for record, _ in kept], "datasets": [ds for _, ds in kept]}
            study_selection.add_selected_series(SelectedSeries(SELECTION_NAME, series, None, metadata=metadata))
        selected.append(study_selection)
    return selected


class T1SagittalSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """``DICOMSeriesSelectorOperator`` whose selection is the indexer's T1-weighted sagittal rule set.

    Same ports as the SDK operator (``dicom_study_list`` in, ``study_selected_series_list`` out). JSON rules
    are not used: see the module docstring for what they cannot express.
    """

    def __init__(self, fragment: Fragment, *args: Any, include_post_contrast: bool = True, **kwargs: Any) -> None:
        self.include_post_contrast = include_post_contrast
        super().__init__(fragment, *args, rules="", all_matched=True, **kwargs)

    def filter(
        self,
        selection_rules: Any,
        dicom_study_list: Sequence[DICOMStudy],
        all_matched: bool = True,
        sort_by_sop_instance_count: bool = False,
    ) -> list[StudySelectedSeries]:
        """Select every T1-weighted sagittal MR series of every study (``selection_rules`` is ignored)."""
        result = select_t1_sagittal_series(dicom_study_list or [], self.include_post_contrast)
        for study_selection in result:
            reasons = Counter(item["reason"] for item in study_selection.metadata()["skipped"])
            logger.info(
                "study %s: %d T1 sagittal series selected; %d instances left out %s",
                study_selection.study.StudyInstanceUID,
                len(study_selection.selected_series),
                sum(reasons.values()),
                dict(sorted(reasons.items())),
            )
        return result


# --- inference ---------------------------------------------------------------------------------------------
class SDLSliceGradingOperator(InferenceOperator):
    """Grade every slice of each selected series and average the probabilities per series.

    Input ``study_selected_series_list``; output ``grades``: ``{"studies": [...], "series": [...]}`` where each
    series entry has its UIDs, ``n_slices``, the per-slice probabilities and their mean. Slices are decoded by
    :class:`scripts.dicom_reader.DicomSliceReader` from the datasets the loader already holds, then go
    through the config's preprocessing without its loader, in batches of ``model.batch_size``.
    """

    def __init__(self, fragment: Fragment, *args: Any, model: GradingModel, **kwargs: Any) -> None:
        self.model = model
        self.reader = DicomSliceReader()
        self.input_name = "study_selected_series_list"
        self.output_name = "grades"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)
        spec.output(self.output_name)

    def pre_process(self, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One decoded slice ``(path, dataset)`` -> preprocessed ``[3, H, W]`` tensor."""
        path, ds = data
        array, meta = self.reader.get_data((path, ds))
        # The same MetaTensor LoadImaged(image_only=True) builds, so every later transform sees the same input.
        image = MetaTensor.ensure_torch_and_prune_meta(array, {**meta, "filename_or_obj": path})
        return self.model.preprocessing({"image": image})["image"]

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, C]`` probabilities (the SDL classifier face averages the branches).

        With the config's ``tta_flip`` on, the mean over the slice and its left-right mirror, as ``run inference``
        does (``scripts.tta``: the ensemble is linear in the branches, so averaging its two outputs is the same).
        """
        images = torch.as_tensor(data).to(self.model.device)
        inferer = FlipTTAInferer() if self.model.tta_flip else SimpleInferer()
        with torch.no_grad():
            out = inferer(images, self.model.network)
        return out.detach().float().cpu()

    def post_process(self, data: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``[N, C]`` slice probabilities -> the series' mean probabilities and grade, averaged as `run inference`
        averages a series (:func:`scripts.reports.average_by`)."""
        probs = np.asarray(data, dtype=np.float64)
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError("the network output is not probabilities (rows do not sum to 1); see metadata.json")
        names = self.model.class_names
        if probs.shape[1] != len(names):
            raise ValueError(f"the network gives {probs.shape[1]} classes, the config's label map {len(names)}")
        (series,) = average_by([{"series": "", "probabilities": p} for p in probs], "series", names)
        return series

    def grade_series(self, selection: SelectedSeries) -> dict[str, Any]:
        """Grade one selected series: slice probabilities, their mean, the grade."""
        metadata = selection.metadata()
        records, datasets = metadata["records"], metadata["datasets"]
        items = [(record["image"], ds) for record, ds in zip(records, datasets, strict=True)]
        chunks = []
        for start in range(0, len(items), self.model.batch_size):
            batch = torch.stack([self.pre_process(item) for item in items[start : start + self.model.batch_size]])
            chunks.append(self.predict(batch))
        probs = torch.cat(chunks).numpy()
        summary = self.post_process(probs)
        names = self.model.class_names
        series = selection.series
        first = records[0]
        return {
            "StudyInstanceUID": first["study_uid"],
            "SeriesInstanceUID": str(series.SeriesInstanceUID),
            "SeriesNumber": first["series_number"],
            "SeriesDescription": first["series_description"],
            "PatientID": first["patient_id"],
            "grade": summary["grade"],
            "grade_name": self.model.display_names[summary["predicted"]],
            "probabilities": {n: float(p) for n, p in zip(names, summary["probabilities"], strict=True)},
            "n_slices": len(records),
            "slices": [
                {
                    "SOPInstanceUID": r["sop_instance_uid"],
                    "InstanceNumber": r["instance_number"],
                    "probabilities": {n: float(p) for n, p in zip(names, row, strict=True)},
                }
                for r, row in zip(records, probs.tolist(), strict=True)
            ],
        }

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        """Grade every selected series of every study and emit the results."""
        selections: list[StudySelectedSeries] = op_input.receive(self.input_name) or []
        studies, series = [], []
        for study_selection in selections:
            reasons = Counter(item["reason"] for item in study_selection.metadata().get("skipped", []))
            studies.append(
                {
                    "StudyInstanceUID": str(study_selection.study.StudyInstanceUID),
                    "series_graded": len(study_selection.selected_series),
                    "instances_left_out": dict(sorted(reasons.items())),
                }
            )
            for selection in study_selection.selected_series:
                entry = self.grade_series(selection)
                logger.info(
                    "series %s (%s): %s from %d slices %s",
                    entry["SeriesInstanceUID"],
                    entry["SeriesDescription"],
                    entry["grade_name"],
                    entry["n_slices"],
                    {k: round(v, 4) for k, v in entry["probabilities"].items()},
                )
                series.append(entry)
        op_output.emit({"studies": studies, "series": series}, self.output_name)


# --- outputs -----------------------------------------------------------------------------------------------
def study_report_text(series: Sequence[Mapping[str, Any]], display_names: Mapping[str, str]) -> str:
    """Plain-text findings of one study for the SR: one paragraph per graded series."""
    lines = ["SDL glioma grading (WHO grade) of T1-weighted sagittal MR series.", DISCLAIMER, ""]
    for entry in series:
        probs = ", ".join(f"{display_names.get(k, k)} {v:.3f}" for k, v in entry["probabilities"].items())
        number = "" if entry["SeriesNumber"] is None else f" {entry['SeriesNumber']}"
        lines.append(
            f'Series{number} "{entry["SeriesDescription"]}" '
            f"(SeriesInstanceUID {entry['SeriesInstanceUID']}): {entry['grade_name']}. "
            f"Probabilities (mean of {entry['n_slices']} slices): {probs}."
        )
    return "\n".join(lines)


class GradeReportOperator(Operator):
    """Write ``grade.json`` and emit one SR text per study (``text``: ``{StudyInstanceUID: text}``)."""

    def __init__(
        self, fragment: Fragment, *args: Any, output_folder: str | Path, model: GradingModel, **kwargs: Any
    ) -> None:
        self.output_folder = Path(output_folder)
        self.model = model
        self.input_name = "grades"
        self.output_name = "text"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name)
        spec.output(self.output_name).condition(ConditionType.NONE)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        """Write the JSON report, then hand the per-study texts to the SR writer."""
        grades = op_input.receive(self.input_name)
        model = self.model
        content = {
            "prediction": PREDICTION_RULE,
            "disclaimer": DISCLAIMER,
            "class_names": model.class_names,
            "class_display_names": dict(zip(model.class_names, model.display_names, strict=True)),
            "model": {
                "path": model.path,
                "form": model.source,
                "version": model.meta.get("version", ""),
                "sha256": model.sha256,
                "tta_flip": model.tta_flip,
            },
            "studies": grades["studies"],
            "series": grades["series"],
        }
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / GRADE_JSON
        path.write_text(json.dumps(content, indent=2), encoding="utf-8")
        if not grades["series"]:
            logger.warning("no T1-weighted sagittal MR series found; %s lists why instances were left out", path)
        logger.info("%d series graded; results in %s", len(grades["series"]), path)
        display = content["class_display_names"]
        texts = {}
        for study in grades["studies"]:
            uid = study["StudyInstanceUID"]
            series = [s for s in grades["series"] if s["StudyInstanceUID"] == uid]
            if series:
                texts[uid] = study_report_text(series, display)
        op_output.emit(texts, self.output_name)


class StudyTextSRWriterOperator(DICOMTextSRWriterOperator):
    """The SDK's Basic Text SR writer, once per study: ``text`` is ``{StudyInstanceUID: text}``.

    The SDK operator copies the study and patient modules from the first selected series of the whole input,
    so a folder with two studies would get one SR filed under the first. Here each study's text is written with
    that study's first selected series; the encoding (``write``) is the SDK's.
    """

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        """Write one SR per study that has a graded series."""
        texts: dict[str, str] = op_input.receive(self.input_name_text) or {}
        selections: list[StudySelectedSeries] = op_input.receive(self.input_name_dcm_series) or []
        for study_selection in selections:
            text = texts.get(str(study_selection.study.StudyInstanceUID), "")
            if not text or not study_selection.selected_series:
                continue
            self.output_folder.mkdir(parents=True, exist_ok=True)
            self.write(text, study_selection.selected_series[0].series, self.output_folder)


def default_equipment_info() -> EquipmentInfo:
    """Equipment module of the SR: this app on top of MONAI Deploy."""
    return EquipmentInfo(manufacturer="MONAI Deploy", manufacturer_model="SDL glioma grading app")
