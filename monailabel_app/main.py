"""MONAI Label app: the SDL glioma bundle as a classification model.

    monailabel start_server --app monailabel_app --studies SLICES_DIR --conf models sdl_glioma

``--conf`` keys (all optional):

* ``models``: ``sdl_glioma`` or ``all`` (the only model);
* ``bundle_path``: the bundle folder (default: ``bundle/`` beside this app). Training replaces its
  ``models/model.pt``, so point it at a copy to keep the shipped weights;
* ``grades_csv`` (default ``<studies>/grades.csv`` when present), ``patient_column`` (``Sample``),
  ``grade_column`` (``Grade``): grades for images that have no final label, joined on the DICOM PatientID;
* ``preload``: ``true`` to load the network at start-up.

MONAI Label loads this file by path with the app folder on ``sys.path``, hence ``from lib...`` imports.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from lib.grading import MODEL_NAME, infer_request_problem, resolve_bundle_path, select_models
from lib.infer import SDLGliomaInfer
from lib.train import SDLGliomaTrain
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)

DICOM_PATTERNS = ("*.dcm", "*.DCM", "*.dicom")


class SDLGliomaApp(MONAILabelApp):
    """One model, ``sdl_glioma``: infer grades a DICOM slice of the datastore, train fine-tunes the bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.sdl_bundle = resolve_bundle_path(conf.get("bundle_path"), app_dir)
        self.models = select_models(conf.get("models"))
        default_csv = os.path.join(studies, "grades.csv") if not studies.startswith(("http://", "https://")) else ""
        self.grades_csv = conf.get("grades_csv") or (default_csv if os.path.isfile(default_csv) else None)
        logger.info("SDL glioma bundle %s; models %s; grades CSV %s", self.sdl_bundle, self.models, self.grades_csv)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SDL glioma grading",
            description="WHO grade II, III or IV of a T1 sagittal MR slice (Synergic Deep Learning); research only",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore, also listing DICOM files (its defaults are NIfTI, NRRD and pictures)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, *DICOM_PATTERNS]))
        return LocalDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = SDLGliomaInfer(str(self.sdl_bundle), self.conf)
        if not task.is_valid():
            raise RuntimeError(f"{self.sdl_bundle} cannot be served: see the warning above (no model.pt?)")
        return {MODEL_NAME: task} if MODEL_NAME in self.models else {}

    def init_trainers(self) -> dict[str, TrainTask]:
        if MODEL_NAME not in self.models:
            return {}
        task = SDLGliomaTrain(
            str(self.sdl_bundle),
            self.conf,
            grades_csv=self.grades_csv,
            patient_column=self.conf.get("patient_column", "Sample"),
            grade_column=self.conf.get("grade_column", "Grade"),
        )
        return {MODEL_NAME: task}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """A request for an unknown model or image, or for a resume checkpoint, gets a 4xx naming it, not a 500."""
        problem = infer_request_problem(request, self._infers, datastore or self.datastore())
        if problem:
            raise HTTPException(status_code=problem[0], detail=problem[1])
        return super().infer(request, datastore)

    def info(self) -> dict[str, Any]:
        """MONAI Label's app info plus where the bundle and the grades come from."""
        info = super().info()
        info["bundle_path"] = str(self.sdl_bundle)
        info["grades_csv"] = self.grades_csv
        return info
