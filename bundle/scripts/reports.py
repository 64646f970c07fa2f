"""Turn an evaluator's per-slice outputs into the files users read: metrics, prediction tables, plots.

:class:`PredictionWriter` is an Ignite handler attached to the `SDLEvaluator` of `run evaluating` and
`run inference`. It gathers every slice's ensemble and per-branch probabilities together with the record's
identifiers as the evaluator runs, and writes everything once the run completes:

- evaluating: ``metrics.json`` (slice level for the ensemble and each branch alone, patient level for the
  ensemble), ``predictions.csv`` (one row a slice), ``patients.csv`` (grade by averaged slice
  probabilities) and ``confusion_matrix.png``;
- inference: ``predictions.json`` (one record a slice and one a series) and ``predictions.csv``.

Slices that :class:`scripts.gradcam.GradCAMWriter` drew overlays for carry their PNG paths (relative to
``output_dir`` when inside it) in both tables; ``tta_flip`` records whether the evaluator averaged each slice
with its mirror (:mod:`scripts.tta`), so a metrics file says which prediction rule produced it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.metrics import classification_metrics

logger = logging.getLogger(__name__)

# Record fields copied to the prediction tables when present. Identifiers only: the indexer never puts
# names or birth dates in a record, and nothing else is read from the batch.
ID_FIELDS = ("image_path", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "instance_number")


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def average_by(rows: list[dict], key: str, class_names: Sequence[str]) -> list[dict]:
    """One row per value of ``key`` (patient or series) with the mean of its slices' probabilities."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row.get(key, ""))].append(row)
    averaged = []
    for group_id in sorted(groups):
        members = groups[group_id]
        probs = np.mean([m["probabilities"] for m in members], axis=0)
        entry = {
            key: group_id,
            "n_slices": len(members),
            "predicted": int(probs.argmax()),
            "grade": class_names[int(probs.argmax())],
            "probabilities": probs.tolist(),
        }
        for field in ("patient_id", "label"):
            if field != key and field in members[0]:
                entry[field] = members[0][field]
        averaged.append(entry)
    return averaged


def new_figure(*args: object, **kwargs: object) -> tuple:
    """``plt.subplots`` on the file-only Agg backend, so figures render on headless CI and servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def markdown_cell(value: Any) -> str:
    """A value as one Markdown table cell: ``|`` escaped, line breaks flattened, None empty."""
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines (header, rule, one line per row), every cell through :func:`markdown_cell`."""
    lines = ["| " + " | ".join(markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG (creating its folder) and close it, so long runs leak no figures."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    """Save a labelled confusion matrix (true on rows, predicted on columns) as PNG."""
    matrix = np.asarray(matrix)
    fig, ax = new_figure(figsize=(4 + 0.4 * len(class_names), 3.5 + 0.4 * len(class_names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), labels=class_names)
    ax.set_yticks(range(len(class_names)), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > threshold else "black",
            )
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


class PredictionWriter:
    """Collect per-slice predictions from an `SDLEvaluator` and write reports when it completes.

    Args:
        output_dir: folder for the files (created).
        class_names: names of the classes in label order, e.g. ``["II", "III", "IV"]``.
        mode: ``"evaluate"`` (labels required; metrics, tables, plot) or ``"inference"`` (no labels).
        split_name: written into ``metrics.json`` so a reader knows which data the figures come from.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        mode: str = "evaluate",
        split_name: str = "test",
    ) -> None:
        if mode not in ("evaluate", "inference"):
            raise ValueError(f"mode must be 'evaluate' or 'inference', got {mode!r}")
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.mode = mode
        self.split_name = split_name
        self.rows: list[dict] = []
        self.tta_flip = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []
        self.tta_flip = bool(getattr(engine, "tta_flip", False))

    def _collect(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, dict):  # evaluator run with decollate=False: split the batch ourselves
            from monai.data import decollate_batch

            outputs, batch = decollate_batch(outputs), decollate_batch(batch)
        for output, item in zip(outputs, batch, strict=True):
            row = {field: _scalar(item[field]) for field in ID_FIELDS if field in item}
            row["probabilities"] = _as_numpy(output["pred"]).reshape(-1).tolist()
            if "branch_preds" in output:
                row["branch_probabilities"] = _as_numpy(output["branch_preds"]).tolist()
            if output.get("gradcam"):
                row["gradcam"] = [self._relative(path) for path in output["gradcam"]]
            if self.mode == "evaluate":
                row["label"] = int(_scalar(output.get("label", item.get("label"))))
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "evaluate":
            self.write_evaluation()
        else:
            self.write_inference()

    def _relative(self, path: str) -> str:
        """``path`` relative to ``output_dir`` when inside it, so the output folder can be moved as a whole."""
        try:
            return Path(path).resolve().relative_to(self.output_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    # ----------------------------------------------------------------------------------------------------
    def _slice_table(self, path: Path) -> None:
        fields = [f for f in ID_FIELDS if any(f in r for r in self.rows)]
        header = fields + (["label", "true_grade"] if self.mode == "evaluate" else [])
        header += ["predicted_grade"] + [f"p_{c}" for c in self.class_names]
        n_branches = len(self.rows[0].get("branch_probabilities", [])) if self.rows else 0
        header += [f"branch{b + 1}_p_{c}" for b in range(n_branches) for c in self.class_names]
        n_cams = max((len(r.get("gradcam", [])) for r in self.rows), default=0)
        header += [f"gradcam_branch{b + 1}" for b in range(n_cams)]
        with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:  # any file name
            writer = csv.writer(f)
            writer.writerow(header)
            for row in self.rows:
                probs = row["probabilities"]
                line = [row.get(field, "") for field in fields]
                if self.mode == "evaluate":
                    line += [row["label"], self.class_names[row["label"]]]
                line += [self.class_names[int(np.argmax(probs))]] + [f"{p:.6f}" for p in probs]
                for branch in row.get("branch_probabilities", []):
                    line += [f"{p:.6f}" for p in branch]
                cams = row.get("gradcam", [])
                line += list(cams) + [""] * (n_cams - len(cams))
                writer.writerow(line)

    def write_evaluation(self) -> dict:
        """Write metrics.json, predictions.csv, patients.csv and confusion_matrix.png; return the metrics."""
        if not self.rows:
            raise RuntimeError("the evaluator produced no predictions: is the evaluation split empty?")
        labels = np.array([r["label"] for r in self.rows])
        ensemble = np.array([r["probabilities"] for r in self.rows])
        slice_metrics = {"ensemble": classification_metrics(ensemble, labels, self.class_names)}
        if "branch_probabilities" in self.rows[0]:
            branches = np.array([r["branch_probabilities"] for r in self.rows])  # [N_slices, B, C]
            for b in range(branches.shape[1]):
                slice_metrics[f"branch{b + 1}"] = classification_metrics(branches[:, b], labels, self.class_names)

        patients = average_by(self.rows, "patient_id", self.class_names)
        patient_metrics = classification_metrics(
            np.array([p["probabilities"] for p in patients]), np.array([p["label"] for p in patients]), self.class_names
        )
        metrics = {
            "split": self.split_name,
            "n_slices": len(self.rows),
            "n_patients": len(patients),
            "prediction": "argmax of the mean of the branches' softmax probabilities (ensemble)",
            "tta_flip": self.tta_flip,
            "slice_level": slice_metrics,
            "patient_level": {"ensemble": patient_metrics},
        }
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._slice_table(self.output_dir / "predictions.csv")
        with open(self.output_dir / "patients.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["patient_id", "n_slices", "true_grade", "predicted_grade"] + [f"p_{c}" for c in self.class_names]
            )
            for p in patients:
                writer.writerow(
                    [p["patient_id"], p["n_slices"], self.class_names[p["label"]], p["grade"]]
                    + [f"{v:.6f}" for v in p["probabilities"]]
                )
        plot_confusion_matrix(
            slice_metrics["ensemble"]["confusion_matrix"],
            self.class_names,
            self.output_dir / "confusion_matrix.png",
            f"SDL ensemble, {self.split_name} slices (acc {slice_metrics['ensemble']['accuracy']:.3f})",
        )
        logger.info(
            "evaluation on %d %s slices of %d patients: ensemble accuracy %.4f (slice), %.4f (patient); files in %s",
            len(self.rows),
            self.split_name,
            len(patients),
            slice_metrics["ensemble"]["accuracy"],
            patient_metrics["accuracy"],
            self.output_dir,
        )
        return metrics

    def write_inference(self) -> dict:
        """Write predictions.json (per slice and per series) and predictions.csv; return the JSON content."""
        slices = []
        for row in self.rows:
            probs = row["probabilities"]
            record = {k: row[k] for k in ID_FIELDS if k in row}
            record["image"] = record.pop("image_path", "")
            record["grade"] = self.class_names[int(np.argmax(probs))]
            record["probabilities"] = dict(zip(self.class_names, probs, strict=True))
            if row.get("gradcam"):
                record["gradcam"] = {f"branch{b + 1}": p for b, p in enumerate(row["gradcam"])}
            slices.append(record)
        series = []
        for entry in average_by(self.rows, "series_uid", self.class_names):
            series.append(
                {
                    "series_uid": entry["series_uid"],
                    "patient_id": entry.get("patient_id", ""),
                    "n_slices": entry["n_slices"],
                    "grade": entry["grade"],
                    "probabilities": dict(zip(self.class_names, entry["probabilities"], strict=True)),
                }
            )
        content = {
            "prediction": "argmax of the mean of the branches' softmax probabilities; a series averages its slices",
            "tta_flip": self.tta_flip,
            "slices": slices,
            "series": series,
        }
        (self.output_dir / "predictions.json").write_text(json.dumps(content, indent=2))
        self._slice_table(self.output_dir / "predictions.csv")
        logger.info("inference: %d slices in %d series; predictions in %s", len(slices), len(series), self.output_dir)
        return content
