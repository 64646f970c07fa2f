"""Glue the bundle configs call: where the slices come from, what goes to the logs, where to resume.

Kept apart from the data layer so the configs stay wiring only: each function here answers one question a
run asks before or while it trains ("which datalist?", "which slices of this input?", "which checkpoint
do I resume from?").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from scripts.checkpoints import atomic_save
from scripts.flags import as_flag
from scripts.model_settings import write_model_settings

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
    dataset_dir: str | None = None,
    grades_csv: str | None = None,
    *,
    index_output: str | None = None,
    patient_column: str = "Sample",
    grade_column: str = "Grade",
    label_map: Mapping[str, int] | None = None,
    grade_aliases: Mapping[str, str] | None = None,
    include_post_contrast: bool = True,
    demo_cache_dir: str | None = None,
    image_folder: str | None = None,
    skipped_csv: str | None = None,
) -> list[dict]:
    """The records a run trains and evaluates on, from the first source given, less any that cannot be loaded.

    1. ``datalist``: a JSON written by ``run indexing`` (or by hand);
    2. ``image_folder``: a folder-per-class PNG/JPG dataset (``scripts.image_folder``) indexed now, its
       datalist and skipped-files CSV written to ``index_output`` (default ``<image_folder>_datalist.json``);
    3. ``dataset_dir`` + ``grades_csv``: a DICOM tree indexed now, its datalist and report written to
       ``index_output`` (default: ``<dataset_dir>_datalist.json`` beside the tree);
    4. nothing: the synthetic demo dataset, generated on first use into a cache folder.

    Every slice is decoded once (:func:`scripts.transforms.split_loadable`); one that cannot be is left out,
    logged, and listed in ``skipped_csv`` (``path,reason,detail``, written whenever given), so one bad file
    never stops a run.
    """
    records = _resolve_sources(
        datalist, dataset_dir, grades_csv, index_output, patient_column, grade_column, label_map, grade_aliases,
        include_post_contrast, demo_cache_dir, image_folder,
    )  # fmt: skip
    return _loadable(_with_image_path(records), skipped_csv, what=f"records of {datalist or dataset_dir or 'the demo'}")


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
    datalist, dataset_dir, grades_csv, index_output, patient_column, grade_column, label_map, grade_aliases,
    include_post_contrast, demo_cache_dir, image_folder,
) -> list[dict]:  # fmt: skip
    from scripts.dicom_index import write_datalist

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
        patient_column, grade_column = "Sample", "Grade"
        logger.warning("no dataset given: training on the SYNTHETIC demo dataset in %s (not patient data)", dataset_dir)
    if index_output is None:
        index_output = str(Path(dataset_dir).resolve().parent / f"{Path(dataset_dir).name}_datalist.json")
    records = write_datalist(
        dataset_dir,
        grades_csv,
        index_output,
        patient_column=patient_column,
        grade_column=grade_column,
        label_map=label_map,
        grade_aliases=grade_aliases,
        include_post_contrast=include_post_contrast,
    )
    return records


def inference_records(
    input_path: str, output_dir: str, *, include_post_contrast: bool = True, images: bool = False
) -> list[dict]:
    """T1-weighted sagittal slices of a DICOM file, series folder or tree, selected as the indexer does.

    Files left out, at selection or because their pixels cannot be decoded, are listed in
    ``output_dir/skipped.csv`` with their reasons, so a user who expected a slice to be graded can see why it
    was not; the others are graded. ``images=True`` (a model trained on an image folder) takes
    a PNG/JPG file or every image below a folder instead (``scripts.image_folder.image_inference_records``).
    """
    from scripts.dicom_index import select_t1_sagittal

    if not input_path:
        raise ValueError("inference needs --input: a DICOM file, a series folder or a DICOM tree")
    if images:
        from scripts.image_folder import image_inference_records

        return image_inference_records(input_path, output_dir)
    result = select_t1_sagittal(input_path, include_post_contrast=include_post_contrast)
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


class ScalarOutputs:
    """Output transform giving the named scalars of a trainer's output, for Stats/TensorBoard handlers.

    MONAI decollates the trainer output into one dict per sample and repeats the batch's scalars in each,
    so the first sample holds them all.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def __call__(self, output) -> dict[str, float]:
        first = output[0] if isinstance(output, list) else output
        return {key: float(first[key]) for key in self.keys if key in first}


class OutputKey:
    """Output transform giving one key of every decollated sample, e.g. per-branch predictions."""

    def __init__(self, pred_key: str, label_key: str) -> None:
        self.pred_key, self.label_key = pred_key, label_key

    def __call__(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(output, dict):
            return output[self.pred_key], output[self.label_key]
        # decollation pads samples past this branch's batch with None (the output also holds the
        # concatenation of every branch's predictions, which is longer): keep the real ones.
        kept = [o for o in output if o.get(self.pred_key) is not None]
        preds = torch.stack([o[self.pred_key] for o in kept])
        labels = torch.stack([torch.as_tensor(o[self.label_key]) for o in kept])
        return preds, labels


class BranchOutput:
    """``(probabilities, labels)`` of one branch from an evaluator's output, for per-branch metrics.

    `scripts.trainer.SDLEvaluator` puts every branch's probabilities in ``branch_preds`` (``[N, C]`` per
    decollated sample, ``[B, N, C]`` for a whole batch).
    """

    def __init__(self, branch: int) -> None:
        self.branch = branch

    def __call__(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(output, dict):
            return output["branch_preds"][:, self.branch], output["label"]
        preds = torch.stack([o["branch_preds"][self.branch] for o in output])
        labels = torch.stack([torch.as_tensor(o["label"]) for o in output])
        return preds, labels


class PatientLevelMetric(Metric):
    """Accuracy or macro one-vs-rest AUC over *patients*, each graded by the mean of its slices' probabilities.

    A grade belongs to a patient, and the test reports (``patients.csv``, ``metrics.json``) grade patients by
    that mean (`scripts.reports`); selecting settings on slice accuracy would favour patients with many
    slices. Ignite hands a metric only the evaluator's output, which carries no patient id, so this metric
    reads the ids from the batch beside it. Not synchronised across processes: with a `DistributedSampler`
    each rank would score its own share of the patients.
    """

    def __init__(self, kind: str = "accuracy") -> None:
        if kind not in ("accuracy", "auc"):
            raise ValueError(f"kind must be 'accuracy' or 'auc', got {kind!r}")
        self.kind = kind
        super().__init__()

    def reset(self) -> None:
        self._rows: list[dict] = []

    def update(self, output: Sequence[tuple[str, list[float], int]]) -> None:
        for patient_id, probabilities, label in output:
            row = {"patient_id": patient_id, "probabilities": probabilities, "label": label}
            self._rows.append(row)

    def iteration_completed(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):  # an evaluator run with decollate=False
            from monai.data import decollate_batch

            outputs, batch = decollate_batch(outputs), decollate_batch(batch)
        rows = []
        for out, item in zip(outputs, batch, strict=True):
            probabilities = torch.as_tensor(out["pred"]).detach().float().cpu().reshape(-1).tolist()
            rows.append((str(item["patient_id"]), probabilities, int(torch.as_tensor(out["label"]).reshape(-1)[0])))
        self.update(rows)

    def compute(self) -> float:
        from scripts.metrics import classification_metrics
        from scripts.reports import _average_by

        if not self._rows:
            raise RuntimeError("PatientLevelMetric needs at least one validation slice")
        names = [str(c) for c in range(len(self._rows[0]["probabilities"]))]
        patients = _average_by(self._rows, "patient_id", names)
        metrics = classification_metrics([p["probabilities"] for p in patients], [p["label"] for p in patients], names)
        value = metrics["accuracy"] if self.kind == "accuracy" else metrics["macro"]["auc"]
        return float("nan") if value is None else float(value)


def validation_metrics(num_branches: int, patient_level: bool = False) -> dict:
    """Validation metrics besides ``val_acc``: each branch's accuracy and the ensemble's cross-entropy.

    ``val_loss`` is the negative log of the probability the ensemble gives the true grade, averaged over
    slices: the validation loss curve of the paper's figures, comparable with the training CE. With
    ``patient_level`` (set by tune.yaml, the objective of `run tune`), also ``val_patient_acc`` and
    ``val_patient_auc`` (:class:`PatientLevelMetric`).
    """
    from ignite.metrics import Accuracy, Loss
    from monai.handlers import from_engine

    from scripts.metrics import nll_of_probabilities

    metrics: dict = {"val_loss": Loss(nll_of_probabilities, output_transform=from_engine(["pred", "label"]))}
    for b in range(num_branches):
        metrics[f"val_acc_branch{b + 1}"] = Accuracy(output_transform=BranchOutput(b))
    if as_flag(patient_level):
        metrics["val_patient_acc"] = PatientLevelMetric("accuracy")
        metrics["val_patient_auc"] = PatientLevelMetric("auc")
    return metrics


class LearningRateRecorder:
    """Store the optimizer's learning rate in ``engine.state.learning_rate`` at the end of every epoch, so
    `TensorBoardStatsHandler(state_attributes=["learning_rate"])` plots the paper's decay."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def attach(self, engine: Engine) -> None:
        engine.state.learning_rate = self.optimizer.param_groups[0]["lr"]
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.learning_rate = self.optimizer.param_groups[0]["lr"]


class BestModelSaver:
    """Save the network's bare state_dict to ``save_dir/filename`` whenever the evaluator's key metric improves.

    A bare state_dict is what model-zoo bundles ship as ``models/model.pt`` (MONAI's `CheckpointSaver` writes
    a lone object that way): ``ckpt_export`` without ``--key_in_ckpt``, `CheckpointLoader` with
    ``load_dict={"model": net}`` and MONAI Label's bundle tasks all load it as is. The file is
    written to a temporary name and renamed, so an interrupted save never leaves a broken ``model.pt``.
    The best value and its epoch go to ``<filename stem>_metric.json`` beside it; a resumed run
    (``resume=True``) starts from that value, so it only replaces the model with a better one. With ``settings``
    (the config's ``model_settings``), ``model_settings.json`` is written beside the model each time it is saved
    (:mod:`scripts.model_settings`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        save_dir: str | Path,
        metric_name: str,
        filename: str = "model.pt",
        resume: bool = False,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.settings = settings
        self.path = Path(save_dir) / filename
        self.metric_path = self.path.with_name(f"{self.path.stem}_metric.json")
        self.metric_name = metric_name
        self.best = float("-inf")
        if as_flag(resume) and self.path.is_file() and self.metric_path.is_file():
            self.best = float(json.loads(self.metric_path.read_text())[metric_name])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if value <= self.best:
            return
        self.best = value
        network = getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel
        atomic_save(network.state_dict(), self.path)
        if self.settings is not None:
            write_model_settings(self.path, self.settings)
        self.metric_path.write_text(json.dumps({self.metric_name: value, "epoch": engine.state.epoch}))
        logger.info("saved %s (%s %.4f)", self.path, self.metric_name, value)


def attach_handlers(engine: Engine, handlers: Sequence) -> Engine:
    """Attach handlers to an engine that already exists (those whose config refers to the engine itself)."""
    for handler in handlers:
        handler.attach(engine)
    return engine
