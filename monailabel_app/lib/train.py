"""MONAI Label training task: fine-tune the SDL glioma bundle on the graded slices of the datastore.

``BundleTrainTask`` (MONAI Label 0.8.5) builds ``[{"image", "label": <label file>}]`` from the datastore, splits
it per slice and overrides ``train#dataset#data``. None of that fits a classifier trained on pairs: the grade
is a word, not a label file; slices of one patient must not straddle the split; and the bundle's training
dataset is ``GroupDataset.from_records(records=...)``, which has no ``data``. This subclass builds the bundle's
own records (``grading.build_records``) and overrides ``records`` instead (``grading.training_overrides``), so
``run training`` runs as it does from the command line: patient-level split, pairs re-drawn every epoch,
``models/model.pt`` replaced by the best validation epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

from .grading import TRAIN_DEFAULTS, build_records, datastore_items, training_overrides

logger = logging.getLogger(__name__)


class SDLGliomaTrain(BundleTrainTask):
    """Train request -> bundle ``run training`` on the datastore's graded slices.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` values.
        grades_csv: optional REMBRANDT-style table (patient, grade) for images without a label file.
        patient_column, grade_column: its columns.
    """

    def __init__(
        self,
        path: str,
        conf: dict[str, str],
        grades_csv: str | None = None,
        patient_column: str = "Sample",
        grade_column: str = "Grade",
        **kwargs: Any,
    ) -> None:
        super().__init__(path, conf, model_dict_key="model", load_strict=True, **kwargs)
        self.grades_csv = grades_csv
        self.patient_column = patient_column
        self.grade_column = grade_column
        self._request: dict[str, Any] = {}
        self._val_split: float | None = None
        self._records: list[dict[str, Any]] = []

    def config(self) -> dict[str, Any]:
        """MONAI Label's train options (what a viewer's training panel shows) with this bundle's defaults."""
        options = super().config()
        options.update({**TRAIN_DEFAULTS, "batch_size": 8, "num_workers": 2})
        return options

    def _label_map(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.bundle_config.get_parsed_content("label_map").items()}

    def _grade_table(self):
        if not self.grades_csv or not Path(self.grades_csv).is_file():
            return None
        from scripts.grades import read_grades

        return read_grades(
            self.grades_csv,
            patient_column=self.patient_column,
            grade_column=self.grade_column,
            label_map=self._label_map(),
        )

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict:
        """Run ``run training`` with the bundle's defaults for the options the request leaves out."""
        request = {**TRAIN_DEFAULTS, **request}
        self._request = request
        return super().__call__(request, datastore)

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        """The bundle's records for every datastore image that has a grade; the rest are logged with the reason."""
        records, skipped = build_records(
            datastore_items(datastore), label_map=self._label_map(), grades=self._grade_table()
        )
        for item in skipped:
            logger.warning("not training on %s: %s", item["image_id"], item["reason"])
        if not records:
            raise ValueError(
                f"no graded image in the datastore ({len(skipped)} without a grade): save a final label holding "
                "the grade (e.g. a text file 'IV') or start the app with --conf grades_csv FILE"
            )
        patients = {r["patient_id"] for r in records}
        sources = Counter(r["grade_source"] for r in records)
        logger.info(
            "training records: %d slices of %d patients, grades from %s; %d images skipped",
            len(records),
            len(patients),
            dict(sources),
            len(skipped),
        )
        self._records = records
        return records

    def _partition_datalist(self, datalist, request, shuffle=False):
        """No per-slice split here: the bundle splits the records by patient (``val_split`` -> ``val_fraction``)."""
        val_split = request.get("val_split", 0.15)
        self._val_split = None if val_split is None else float(val_split)
        return datalist, None

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return training_overrides(overrides, self._records, val_split=self._val_split, request=self._request)
