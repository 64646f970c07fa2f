"""The evidence experiment: does the synergic head help, beyond what averaging two networks gives?

``run evidence`` trains and evaluates every *arm* on every cell of patient-grouped k-fold x seeds (each seed
its own fold partition, pairs, initialisation and augmentation: repeated k-fold). Every arm of a cell has the
same folds, transforms, epochs and checkpoint choice on validation patients carved from the fold's training
patients, so arms can be compared cell by cell:

* ``sdl``: SDL^2 (two branches and the synergic head, default lambda);
* ``single``: one branch with cross-entropy only (``baseline.yaml``);
* ``ensemble``: two branches trained on the same pair stream with lambda 0, so no synergic gradient reaches
  them (the head still trains beside them, learning nothing they use), graded by the same mean of the branches'
  probabilities: the control that separates synergy from ensembling, which neither SDL paper ran;
* ``sdl3``: SDL^3;
* ``sdl_paper_protocol``: SDL^2 under the paper's protocol: a slice-level split (one draw per cell), fixed
  pairs, and the checkpoint chosen on the test slices. Beside ``sdl`` it measures the protocol's inflation.

Each cell is an ordinary bundle run (``scripts.experiments``), skipped when its ``eval/metrics.json`` exists,
so an interrupted experiment continues where it stopped. ``summary.json`` holds each arm's cells and their
mean and sample std, and for each pair of arms the paired differences with two tests: Wilcoxon's signed-rank
test and Nadeau and Bengio's corrected resampled t-test (the cells' training sets overlap, so a plain paired t
over cells is over-confident; its variance is inflated by ``1/n + n_test/n_train``, here ``1/(k-1)`` for k
folds), with the corrected 95 % confidence interval of the mean difference.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from scripts.experiments import (
    LEVELS,
    METRIC_NAMES,
    Experiment,
    RunSpec,
    format_metric,
    headline_metrics,
    mean_and_std,
    write_summary,
)
from scripts.reports import markdown_table, new_figure, save_figure

__all__ = ["ARMS", "Arm", "paired_comparison", "run_evidence"]


@dataclass(frozen=True)
class Arm:
    """One setting of the evidence experiment: what it is, its extra config files and overrides."""

    description: str
    config_files: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    slice_split: bool = False  # the paper's slice-level split instead of the cell's patient fold


ARMS: dict[str, Arm] = {
    "sdl": Arm("SDL^2: two branches and the synergic head"),
    "single": Arm("one branch, cross-entropy only", ("baseline.yaml",)),
    "ensemble": Arm("two branches on the same pairs, no synergic gradient (lambda 0)", (), {"synergic_lambda": 0.0}),
    "sdl3": Arm("SDL^3: three branches, three synergic heads", (), {"num_branches": 3}),
    "sdl_paper_protocol": Arm(
        "SDL^2 under the paper's protocol: slice-level split, fixed pairs, checkpoint chosen on the test slices",
        (),
        {"split_protocol": "slice", "pairing": "paper", "validate#split": "test"},
        slice_split=True,
    ),
}
# The comparisons the summary's Markdown shows first (all pairs are in summary.json).
KEY_PAIRS = (
    ("sdl", "ensemble"),
    ("sdl", "single"),
    ("ensemble", "single"),
    ("sdl3", "sdl"),
    ("sdl_paper_protocol", "sdl"),
)


def paired_comparison(a: Sequence[float], b: Sequence[float], test_train_ratio: float) -> dict[str, Any]:
    """Paired differences ``a - b`` over the same cells: their mean, Nadeau and Bengio's corrected resampled
    t-test (``p_value``) with its 95 % confidence interval, and Wilcoxon's signed-rank test (``wilcoxon_p``).

    ``test_train_ratio``: test over training set size of one cell (``1/(k-1)`` for k-fold). Cells where either
    value is undefined (NaN, e.g. an AUC with one class) are left out. A test that is undefined (fewer than two
    cells, or differences that are all equal) is reported as None, never as a made-up p-value.
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    differences = [x - y for x, y in pairs]
    n = len(differences)
    result: dict[str, Any] = {"n": n, "differences": differences, "mean_difference": None, "ci95": None,
                              "t": None, "p_value": None, "wilcoxon_p": None}  # fmt: skip
    if n == 0:
        return result
    mean = sum(differences) / n
    result["mean_difference"] = mean
    if n < 2:
        return result
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    if variance > 0:
        se = math.sqrt((1 / n + test_train_ratio) * variance)
        t = mean / se
        result["t"] = t
        result["p_value"] = float(2 * stats.t.sf(abs(t), df=n - 1))
        half = float(stats.t.ppf(0.975, df=n - 1)) * se
        result["ci95"] = [mean - half, mean + half]
    if any(d != 0 for d in differences):
        result["wilcoxon_p"] = float(stats.wilcoxon(differences).pvalue)
    return result


def _cell_overrides(arm: Arm, fold: int, seed: int, n_folds: int) -> dict[str, Any]:
    if arm.slice_split:  # one slice-level draw per cell
        return {**arm.overrides, "seed": seed, "split_seed": seed * n_folds + fold}
    return {**arm.overrides, "seed": seed, "split_protocol": "kfold", "fold": fold, "n_folds": n_folds}


def _cell_name(arm: str, fold: int, seed: int) -> str:
    return f"{arm}/seed_{seed}_fold_{fold}"


def _ceiling(run_dir: Path) -> dict[str, float] | None:
    """The demo's known best accuracy, from the ``demo_info.json`` of the tree a run's test slices came from."""
    from scripts.demo_data import find_demo_info

    try:
        with open(run_dir / "eval" / "predictions.csv", newline="") as f:
            info = find_demo_info(next(csv.DictReader(f))["image_path"])
    except (OSError, StopIteration, KeyError):
        return None
    if info is None:
        return None
    content = json.loads(info.read_text())
    return {k: content[k] for k in ("ceiling_accuracy_patient", "ceiling_accuracy_slice") if k in content}


def run_evidence(
    arms: Sequence[str] = tuple(ARMS),
    n_folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2),
    output_dir: str | Path = "evidence",
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Train and evaluate ``arms`` on every fold x seed cell; write ``summary.json``, ``summary.md`` and
    ``evidence.png`` (each arm's test accuracy over the cells) into ``output_dir``."""
    arms = [arms] if isinstance(arms, str) else list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    n_folds = int(n_folds)
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    experiment = Experiment.from_context(output_dir, config_file, overrides)
    config_dir = Path(experiment.config_files[0]).parent
    cells = [(fold, seed) for seed in seeds for fold in range(n_folds)]
    results: dict[str, dict[str, Any]] = {}
    for name in arms:
        arm = ARMS[name]
        extra = [str(config_dir / f) for f in arm.config_files]
        rows = []
        for fold, seed in cells:
            spec = RunSpec(_cell_name(name, fold, seed), _cell_overrides(arm, fold, seed, n_folds), extra)
            metrics = experiment.run(spec)
            rows.append({"fold": fold, "seed": seed, "n_test_slices": metrics["n_slices"],
                         "n_test_patients": metrics["n_patients"], **headline_metrics(metrics)})  # fmt: skip
        mean, std = mean_and_std(rows)
        results[name] = {"description": arm.description, "cells": rows, "mean": mean, "std": std}

    ratio = 1 / (n_folds - 1)
    paired = []
    for first, second in itertools.combinations(arms, 2):
        for level in LEVELS:
            for metric in ("accuracy", "f1", "auc"):
                values = [[cell[level][metric] for cell in results[arm]["cells"]] for arm in (first, second)]
                comparison = paired_comparison(values[0], values[1], ratio)
                paired.append({"a": first, "b": second, "level": level, "metric": metric, **comparison})
    ceiling = _ceiling(experiment.output_dir / _cell_name(arms[0], 0, seeds[0]))
    summary = {
        "experiment": "evidence",
        "design": f"{n_folds}-fold patient-grouped cross-validation x seeds {seeds} (each seed its own folds)",
        "model": "mean of the branches' probabilities",
        "std": "sample standard deviation over the fold x seed cells",
        "paired_test": "Nadeau-Bengio corrected resampled t-test (p_value, ci95); Wilcoxon signed-rank (wilcoxon_p)",
        "ceiling": ceiling,
        "arms": results,
        "paired": paired,
    }
    write_summary(experiment.output_dir, summary, _markdown(summary))
    plot_evidence(summary, experiment.output_dir / "evidence.png")
    return summary


def _markdown(summary: Mapping) -> str:
    lines = [f"# Evidence: {summary['design']}", "", f"Graded by the {summary['model']}; ± is the {summary['std']}."]
    if summary["ceiling"]:
        lines += ["", "Best achievable accuracy on this demo data (by construction): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in summary["ceiling"].items())]  # fmt: skip
    for level in LEVELS:
        rows = [[name, arm["description"]]
                + [format_metric(arm["mean"][level][m], arm["std"][level][m]) for m in METRIC_NAMES]
                for name, arm in summary["arms"].items()]  # fmt: skip
        lines += ["", f"## test {level.replace('_', ' ')}", "", *markdown_table(["arm", "what", *METRIC_NAMES], rows)]
    arms = set(summary["arms"])
    shown = [p for p in summary["paired"] if (p["a"], p["b"]) in KEY_PAIRS and {p["a"], p["b"]} <= arms]
    rows = []
    for p in shown:
        ci = "n/a" if p["ci95"] is None else f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
        mean = "n/a" if p["mean_difference"] is None else f"{p['mean_difference']:+.3f}"
        rows.append([f"{p['a']} − {p['b']}", p["level"].replace("_", " "), p["metric"], p["n"], mean, ci,
                     _p(p["p_value"]), _p(p["wilcoxon_p"])])  # fmt: skip
    lines += ["", "## paired differences (same cells)", "",
              *markdown_table(["arms", "level", "metric", "cells", "mean difference", "95 % CI (corrected)",
                               "p (corrected t)", "p (Wilcoxon)"], rows), ""]  # fmt: skip
    lines += ["![test accuracy of each arm over the cells](evidence.png)", ""]
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def plot_evidence(summary: Mapping, path: str | Path) -> Path:
    """Box plots of each arm's test accuracy over the fold x seed cells, slice and patient level."""
    names = list(summary["arms"])
    fig, axes = new_figure(1, 2, figsize=(2.2 * len(names) + 2, 3.8), sharey=True)
    for ax, level in zip(axes, LEVELS, strict=True):
        values = [[c[level]["accuracy"] for c in summary["arms"][n]["cells"]] for n in names]
        ax.boxplot(values)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        ceiling = (summary.get("ceiling") or {}).get(f"ceiling_accuracy_{level.split('_')[0]}")
        if ceiling is not None:
            ax.axhline(ceiling, color="grey", linestyle="--", label="ceiling")
            ax.legend(loc="lower right")
        ax.set_title(f"test accuracy, {level.replace('_', ' ')}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
