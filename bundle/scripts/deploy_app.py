"""MONAI Deploy application: grade the T1-weighted sagittal series of a DICOM study folder with the SDL bundle.

Run::

    python bundle/scripts/deploy_app.py -i STUDY_DIR -o OUT_DIR -m MODEL

MODEL is a TorchScript file exported with ``python -m monai.bundle ckpt_export network_def ...`` (it embeds
metadata.json and inference.json) or a bundle folder with ``configs/inference.yaml``,
``configs/metadata.json`` and ``models/model.pt``. The app writes ``OUT_DIR/grade.json`` and one DICOM Basic
Text SR per study (``OUT_DIR/<SOPInstanceUID>.dcm``). The SDK also reads ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` when the flags are left out, as in a MONAI Application
Package. Graph::

    DICOMDataLoaderOperator -> T1SagittalSeriesSelectorOperator -> SDLSliceGradingOperator
        -> GradeReportOperator (grade.json) -> StudyTextSRWriterOperator (Basic Text SR)

Needs the ``deploy`` extra (``pip install -e ".[deploy]"``); ``bundle/docs/deploy.md`` describes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: import the bundle's `scripts` package, not its modules one by one
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import logging  # noqa: E402

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application  # noqa: E402
from monai.deploy.operators import DICOMDataLoaderOperator  # noqa: E402

from scripts.deploy_operators import (  # noqa: E402
    GradeReportOperator,
    SDLSliceGradingOperator,
    StudyTextSRWriterOperator,
    T1SagittalSeriesSelectorOperator,
    default_equipment_info,
    load_grading_model,
)

__all__ = ["SDLGliomaGradingApp", "main"]

logger = logging.getLogger(__name__)


class SDLGliomaGradingApp(Application):
    """Holoscan/MONAI Deploy application wiring the loader, the selector, the grader and both writers."""

    def compose(self) -> None:
        """Build the operator graph from ``-i/-o/-m`` (or the HOLOSCAN_* variables)."""
        app_context: AppContext = Application.init_app_context(self.argv)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        model = load_grading_model(app_context.model_path)
        logger.info("input %s, output %s, model %s (%s)", input_path, output_path, model.path, model.source)

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = T1SagittalSeriesSelectorOperator(
            self, include_post_contrast=model.include_post_contrast, name="t1_sagittal_selector"
        )
        grader = SDLSliceGradingOperator(self, model=model, name="sdl_slice_grader")
        report = GradeReportOperator(self, output_folder=output_path, model=model, name="grade_json_writer")
        sr_writer = StudyTextSRWriterOperator(
            self,
            output_folder=output_path,
            model_info=model.model_info,
            equipment_info=default_equipment_info(),
            copy_tags=True,
            name="text_sr_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, grader, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(grader, report, {("grades", "grades")})
        self.add_flow(report, sr_writer, {("text", "text")})
        self.add_flow(selector, sr_writer, {("study_selected_series_list", "study_selected_series_list")})


def main(argv: list[str] | None = None) -> None:
    """Run the app; ``argv`` as ``sys.argv`` (program name first), default the process's own arguments."""
    app = SDLGliomaGradingApp([sys.executable, *(argv if argv is not None else sys.argv)])
    app.run()


if __name__ == "__main__":
    main()
