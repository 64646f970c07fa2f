"""MONAI Label inference task: one DICOM slice in, the WHO grade and the three probabilities out.

MONAI Label 0.8.5's ``BundleInferTask`` would treat this bundle as segmentation (it guesses the task from the
folder name) and append ``Restored`` to the post-processing, which needs a label image and crashes on a
``[3]`` probability vector. So the type is given explicitly and restoring is off. The bundle's own
``preprocessing`` (DICOM reader, percentile scaling, 128x128, 3 channels) and network face (mean of the
branches' softmax) are used as they are; its ``postprocessing`` is empty, so the scores MONAI Label
reports are probabilities, not an argmax.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from .grading import MODEL_FILE, format_prediction

logger = logging.getLogger(__name__)


class SDLGliomaInfer(BundleInferTask):
    """Classification face of the SDL glioma bundle for MONAI Label (``/infer/sdl_glioma?image=<id>``)."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        # load_strict: a checkpoint from another network must fail loudly, not grade with random layers.
        super().__init__(path, conf, type=InferType.CLASSIFICATION, add_post_restore=False, load_strict=True, **kwargs)
        self.class_names: list[str] = []
        if self.is_valid():
            # a model trained on tumour regions (--roi mask) needs each slice's lesion mask: refuse it, as run
            # inference does, rather than grade whole slices it never saw
            self.bundle_config.get_parsed_content("whole_slice_check")
            self.class_names = [str(c) for c in self.bundle_config.get_parsed_content("class_names")]
            # MONAI Label offers every models/*.pt as a choice; the resume checkpoints there are not models
            self._config["model_filename"] = [MODEL_FILE]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[None, dict]:
        """No label file (a grade is not an image); the JSON holds MONAI Label's ``prediction`` list and the grade."""
        result = format_prediction(data[self.output_label_key], self.class_names)
        logger.info("SDL glioma grade %s, probabilities %s", result["grade"], result["probabilities"])
        return None, result
