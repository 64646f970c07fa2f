"""`run report`: a Markdown report with PNG figures, built only from what runs wrote, never by re-running.

A *run* is any folder under ``runs_dir`` (``runs_dir`` itself included) holding ``logs/`` with TensorBoard
event files and/or ``eval/metrics.json``: the bundle's own ``bundle/`` after ``run training`` and ``run
evaluating``, and every fold, sweep point or variant of ``scripts.experiments``. An *experiment* is a
``summary.json`` those write. For the paper's figures and tables the report gives:

* per run, the training curves from its TensorBoard logs: each branch's accuracy and cross-entropy per
  epoch with its validation accuracy (Figures 4 and 5), the synergic head's accuracy and loss (Figure 6),
  and the ensemble's validation accuracy and loss;
* the comparison of every evaluated run (Table 2: accuracy and macro precision, recall, specificity, F1,
  AUC of the test split) and the per-class table (Table 3), at slice and patient level;
* each evaluated run's confusion matrix, redrawn from its metrics.json;
* each experiment's table (k-fold mean ± std, protocol comparison, model comparison) and sweep plot
  (Figure 7);
* each hyperparameter search (``run tune``): its summary of the best trials and final test, and its Optuna
  plots (optimisation history, parameter importances, synergic lambda against the objective, intermediate
  values), copied as they are. Its trial runs (``OUT/trials/``, marked by ``OUT/study.json``) are left out of
  the per-run sections: a study holds hundreds of them, and its plots already summarise them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from scripts.experiments import LEVELS, METRIC_NAMES, format_metric, headline_metrics, plot_sweep
from scripts.reports import markdown_table, new_figure, save_figure

logger = logging.getLogger(__name__)

_NOT_RUNS = {"models", "logs", "eval", "figures", "__pycache__", "configs", "scripts", "docs"}
# (panel title, [(tag, label)] for accuracy, [(tag, label)] for loss)
_PANELS = (
    ("Branch 1 (paper Fig. 4)", [("train_acc_branch1", "train acc"), ("val_acc_branch1", "val acc")],
     [("train_ce_branch1", "train CE")]),
    ("Branch 2 (paper Fig. 5)", [("train_acc_branch2", "train acc"), ("val_acc_branch2", "val acc")],
     [("train_ce_branch2", "train CE")]),
    ("Synergic head (paper Fig. 6)", [("train_synergic_acc", "train same-grade acc")],
     [("train_synergic_bce", "train BCE")]),
    ("Ensemble (mean of branches)", [("val_acc", "val acc")],
     [("val_loss", "val CE"), ("train_loss_epoch", "train total loss")]),
)  # fmt: skip


def find_runs(runs_dir: Path, skip: Iterable[Path] = ()) -> list[Path]:
    """Folders under ``runs_dir`` (itself included) with TensorBoard logs or an evaluation, sorted."""
    skip = {p.resolve() for p in skip}
    trials = {marker.parent.resolve() / "trials" for marker in runs_dir.rglob("study.json")}  # run tune's trials
    runs = []
    for folder in [runs_dir, *sorted(p for p in runs_dir.rglob("*") if p.is_dir())]:
        if folder.resolve() in skip or any(part in _NOT_RUNS for part in folder.relative_to(runs_dir).parts):
            continue
        if any(t == folder.resolve() or t in folder.resolve().parents for t in trials):
            continue
        if (folder / "eval" / "metrics.json").is_file() or any((folder / "logs").glob("events.out.tfevents*")):
            runs.append(folder)
    return runs


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``log_dir``: ``{tag: [(step, value), ...]}`` sorted by step.

    A resumed run appends to new event files; the last value written for a step wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted(log_dir.glob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                merged[tag][int(event.step)] = float(event.value)
    return {tag: sorted(values.items()) for tag, values in merged.items()}


# Epoch-mean tags the trainer logs, and the per-iteration tags they average (older runs logged only those).
_EPOCH_MEANS = {"train_ce_branch1": "ce_a", "train_ce_branch2": "ce_b", "train_synergic_bce": "synergic_bce",
                "train_loss_epoch": "loss"}  # fmt: skip


def with_epoch_means(scalars: Mapping[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Add epoch means of per-iteration losses where a run logged no epoch-level mean.

    The epochs come from ``train_acc`` (one value per epoch); iterations are split evenly among them, as
    every epoch of a run has the same number of iterations.
    """
    out = dict(scalars)
    epochs = [step for step, _ in scalars.get("train_acc", [])]
    for epoch_tag, iteration_tag in _EPOCH_MEANS.items():
        if epoch_tag in out or iteration_tag not in scalars or not epochs:
            continue
        values = scalars[iteration_tag]
        per_epoch = max(1, round(values[-1][0] / epochs[-1]))
        means = []
        for epoch in epochs:
            chunk = [v for step, v in values if (epoch - 1) * per_epoch < step <= epoch * per_epoch]
            if chunk:
                means.append((epoch, sum(chunk) / len(chunk)))
        out[epoch_tag] = means
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "run"


def plot_training_curves(scalars: Mapping[str, list[tuple[int, float]]], title: str, path: Path) -> Path | None:
    """One panel per branch, the synergic head and the ensemble: accuracy (solid) and loss (dashed) per epoch."""
    panels = [p for p in _PANELS if any(tag in scalars for tag, _ in (*p[1], *p[2]))]
    if not panels:
        return None
    fig, axes = new_figure(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (panel_title, accuracy_tags, loss_tags) in zip(axes[0], panels, strict=True):
        for tag, label in accuracy_tags:
            if tag in scalars:
                steps, values = zip(*scalars[tag], strict=True)
                ax.plot(steps, values, marker=".", label=label)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        loss_axis = ax.twinx()
        for i, (tag, label) in enumerate(loss_tags):
            if tag in scalars:
                steps, values = zip(*scalars[tag], strict=True)
                loss_axis.plot(steps, values, linestyle="--", color=f"C{3 + i}", label=label)
        loss_axis.set_ylabel("loss")
        handles = ax.get_legend_handles_labels()[0] + loss_axis.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + loss_axis.get_legend_handles_labels()[1]
        ax.legend(handles, labels, fontsize=7, loc="center right")
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def _comparison_table(evaluations: Mapping[str, Mapping], level: str) -> list[str]:
    rows = [
        [name, metrics["n_slices"], metrics["n_patients"]]
        + [format_metric(headline_metrics(metrics)[level][m]) for m in METRIC_NAMES]
        for name, metrics in evaluations.items()
    ]
    return markdown_table(["run", "test slices", "test patients", *METRIC_NAMES], rows)


def _per_class_table(evaluations: Mapping[str, Mapping], level: str) -> list[str]:
    measures = ("precision", "recall", "specificity", "f1")
    rows = [
        [name, class_name] + [format_metric(values.get(m)) for m in measures]
        for name, metrics in evaluations.items()
        for class_name, values in metrics[level]["ensemble"]["per_class"].items()
    ]
    return markdown_table(["run", "class", *measures], rows)


def _branch_table(evaluations: Mapping[str, Mapping]) -> list[str]:
    """Each branch alone against their average: what the ensemble adds (slice level)."""
    rows = [
        [name, model, format_metric(entry["accuracy"]), format_metric(entry["macro"]["auc"])]
        for name, metrics in evaluations.items()
        for model, entry in metrics["slice_level"].items()
    ]
    return markdown_table(["run", "model", "accuracy", "macro AUC"], rows)


def _experiment_section(summary_file: Path, runs_dir: Path, figures: Path) -> list[str]:
    """An experiment's own summary.md, with its plot (if any) redrawn into the report's figures."""
    summary = json.loads(summary_file.read_text())
    name = str(summary_file.parent.relative_to(runs_dir)) if summary_file.parent != runs_dir else runs_dir.name
    markdown_file = summary_file.with_name("summary.md")
    body = (
        markdown_file.read_text() if markdown_file.is_file() else "```json\n" + json.dumps(summary, indent=1) + "\n```"
    )
    body = re.sub(r"^(#+) ", r"###\1 ", body, flags=re.M)  # demote its headings under ours
    body = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", body)  # its images are redrawn below
    lines = [f"### Experiment `{name}` ({summary.get('experiment', 'summary')})", "", body.strip(), ""]
    if summary.get("experiment") == "sweep":
        png = plot_sweep(summary, figures / f"{_slug(name)}_sweep.png")
        lines += [f"![sweep of {summary['key']}](figures/{png.name})", ""]
    if summary.get("experiment") == "evidence":
        from scripts.evidence import plot_evidence

        png = plot_evidence(summary, figures / f"{_slug(name)}_evidence.png")
        lines += [f"![test accuracy of each arm over the cells](figures/{png.name})", ""]
    for plot in summary.get("plots", []) if summary.get("experiment") == "tune" else []:
        source = summary_file.parent / plot
        if source.is_file():  # Optuna's own figures: nothing to redraw from the summary
            target = shutil.copyfile(source, figures / f"{_slug(name)}_{Path(plot).name}")
            lines += [f"![{name}: {Path(plot).stem.replace('_', ' ')}](figures/{Path(target).name})", ""]
    return lines


def write_report(runs_dir: str | Path, output_dir: str | Path) -> Path:
    """Write ``output_dir/report.md`` and its figures (``output_dir/figures/*.png``) from ``runs_dir``."""
    from scripts.reports import plot_confusion_matrix

    runs_dir, output_dir = Path(runs_dir), Path(output_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs_dir {runs_dir} does not exist")
    figures = output_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = find_runs(runs_dir, skip=[output_dir])
    summaries = sorted(p for p in runs_dir.rglob("summary.json") if output_dir.resolve() not in p.resolve().parents)
    if not runs and not summaries:
        raise ValueError(f"no runs under {runs_dir}: a run is a folder with logs/ (TensorBoard) or eval/metrics.json")

    def name_of(run: Path) -> str:
        return runs_dir.name if run == runs_dir else str(run.relative_to(runs_dir))

    lines = [
        "# SDL glioma grading: report",
        "",
        f"Built from `{runs_dir}`: {len(runs)} run(s), {len(summaries)} experiment summary(ies). Every figure and "
        "table comes from the runs' own TensorBoard logs and `eval/metrics.json`; nothing was re-run. Test "
        "metrics are of the ensemble (mean of the branches' probabilities); macro averages over grades.",
        "",
    ]
    evaluations = {}
    for run in runs:
        metrics_file = run / "eval" / "metrics.json"
        if metrics_file.is_file():
            evaluations[name_of(run)] = json.loads(metrics_file.read_text())

    if evaluations:
        lines += ["## Test results (paper Table 2)", ""]
        for level in LEVELS:
            lines += [f"### {level.replace('_', ' ')}", "", *_comparison_table(evaluations, level), ""]
        lines += [
            "## Per-class test results (paper Table 3), slice level",
            "",
            *_per_class_table(evaluations, "slice_level"),
            "",
        ]
        lines += ["## Each branch alone and their average, slice level", "", *_branch_table(evaluations), ""]
    if summaries:
        lines += ["## Experiments", ""]
        for summary_file in summaries:
            lines += _experiment_section(summary_file, runs_dir, figures)

    lines += ["## Runs", ""]
    for run in runs:
        name = name_of(run)
        lines += [f"### `{name}`", ""]
        scalars = with_epoch_means(read_scalars(run / "logs")) if (run / "logs").is_dir() else {}
        curves = plot_training_curves(scalars, name, figures / f"{_slug(name)}_curves.png") if scalars else None
        if curves:
            epochs = len(scalars.get("train_acc", scalars.get("val_acc", [])))
            figure = f"![curves of {name}](figures/{curves.name})"
            lines += [f"Training and validation curves ({epochs} epochs logged):", "", figure, ""]
        if name in evaluations:
            for level in LEVELS:
                entry = evaluations[name][level]["ensemble"]
                png = plot_confusion_matrix(
                    entry["confusion_matrix"],
                    entry["class_names"],
                    figures / f"{_slug(name)}_{level}_confusion.png",
                    f"{name}: test, {level.replace('_', ' ')}",
                )
                lines += [f"![confusion matrix of {name}, {level}](figures/{png.name})", ""]
        if not curves and name not in evaluations:
            lines += ["(no scalar logs and no evaluation)", ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    logger.info("wrote %s with %d figures", report, len(list(figures.glob("*.png"))))
    return report
