"""Experiments made of whole bundle runs: patient-grouped k-fold, split-protocol comparison, sweeps, baselines.

Each experiment is a list of *runs*; a run is ``run training`` then ``run evaluating`` of this same bundle,
with the experiment's command-line overrides plus its own, writing ``models/``, ``logs/`` and ``eval/`` into
its own folder under the experiment's ``output_dir``. So every point of a table is an ordinary bundle run
that can be inspected, re-evaluated or reported on like any other, and the report (``scripts.report``)
reads the runs' own logs rather than re-running anything.

The experiments are started as bundle run ids (``run cross_validation`` ...). A run id cannot see the
command that started it, so the config files and overrides are read back from ``sys.argv`` with the same
value parser (fire's) that ``python -m monai.bundle`` used; from Python, pass ``config_file`` and
``overrides`` instead. A run whose ``eval/metrics.json`` already exists is not repeated, so an interrupted
experiment continues where it stopped when the same command is given again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.reports import markdown_table, new_figure, save_figure

logger = logging.getLogger(__name__)

# Arguments of `monai.bundle run` that are not config overrides.
_RUN_ARGUMENTS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}
# Keys that configure an experiment itself; its runs must not inherit them.
EXPERIMENT_KEYS = {
    "output_dir", "n_folds", "sweep_key", "sweep_values", "variants", "runs_dir", "protocols",
    "arms", "seeds",  # run evidence (scripts/evidence.py)
    # run tune (scripts/tune.py); it gives each trial run its own inner_fold and inner_folds
    "n_trials", "storage", "study_name", "search_space", "search_space_file", "objective", "direction",
    "inner_folds", "inner_fold", "final", "sampler", "pruner", "timeout", "keep_checkpoints",
}  # fmt: skip
# Where each run writes; set per run.
_RUN_DIR_KEYS = ("ckpt_dir", "log_dir", "output_dir")
METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
LEVELS = ("slice_level", "patient_level")


def parse_bundle_command_line(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``python -m monai.bundle run ...`` arguments into (run arguments, config overrides).

    Values are parsed with fire's ``DefaultParseValue``, as ``monai.bundle``'s command line parses them, so
    ``--sweep_values "[3,4]"`` is a list and ``--epochs 1`` an int in both the parent and its runs.
    """
    from fire.parser import DefaultParseValue

    args = list(argv)
    if args and args[0] == "run":
        args = args[1:]
    run_args: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            positional.append(token)
            i += 1
            continue
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "True"
        parsed = DefaultParseValue(value)
        (run_args if key in _RUN_ARGUMENTS else overrides)[key] = parsed
        i += 1
    if positional and "run_id" not in run_args:
        run_args["run_id"] = positional[0]
    return run_args, overrides


def _command_line() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    import sys

    run_args, overrides = parse_bundle_command_line(sys.argv[1:])
    config_file = run_args.pop("config_file", None)
    if config_file is None:
        raise ValueError(
            "experiments read their config files from the command line (`python -m monai.bundle run <id> "
            "--config_file ...`); from Python pass config_file= and overrides="
        )
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    extra = {k: v for k, v in run_args.items() if k in ("meta_file", "logging_file", "tracking")}
    return files, overrides, extra


@dataclass
class RunSpec:
    """One bundle run of an experiment: its folder name, extra config files and overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_config_files: list[str] = field(default_factory=list)


@dataclass
class Experiment:
    """Config files and overrides shared by every run, and where the runs go."""

    config_files: list[str]
    overrides: dict[str, Any]
    output_dir: Path
    run_arguments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_context(
        cls, output_dir: str | Path, config_file: str | Sequence[str] | None, overrides: Mapping[str, Any] | None
    ) -> Experiment:
        run_arguments: dict[str, Any] = {}
        if config_file is None:
            files, cli_overrides, run_arguments = _command_line()
            overrides = {**cli_overrides, **(overrides or {})}
        else:
            files = [config_file] if isinstance(config_file, str) else list(config_file)
        shared = {k: v for k, v in (overrides or {}).items() if k not in EXPERIMENT_KEYS}
        return cls(files, shared, Path(output_dir), run_arguments)

    @property
    def evaluate_config(self) -> str:
        """evaluate.yaml beside the first config file (train.yaml)."""
        return str(Path(self.config_files[0]).parent / "evaluate.yaml")

    def _files_and_overrides(self, spec: RunSpec) -> tuple[Path, list[str], dict[str, Any]]:
        run_dir = self.output_dir / spec.name
        overrides = {**self.overrides, **spec.overrides}
        overrides.update(
            ckpt_dir=str(run_dir / "models"), log_dir=str(run_dir / "logs"), output_dir=str(run_dir / "eval")
        )
        return run_dir, [*self.config_files, *spec.extra_config_files], overrides

    def train(self, spec: RunSpec) -> Path:
        """``run training`` of one run, its config files and overrides written to ``run.json``; its folder."""
        from monai.bundle import run as bundle_run

        run_dir, files, overrides = self._files_and_overrides(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(
            json.dumps({"name": spec.name, "config_file": files, "overrides": overrides}, indent=2, default=str)
        )
        logger.info("%s: training (%s)", spec.name, ", ".join(f"{k}={v}" for k, v in spec.overrides.items()))
        # a run re-trained here (its evaluation never finished) starts afresh over what it left
        bundle_run("training", config_file=files, **self.run_arguments, **{**overrides, "overwrite": True})
        return run_dir

    def run(self, spec: RunSpec) -> dict:
        """Train and evaluate one run (unless its metrics exist already); return its ``metrics.json``."""
        from monai.bundle import run as bundle_run

        run_dir, files, overrides = self._files_and_overrides(spec)
        metrics_file = run_dir / "eval" / "metrics.json"
        if metrics_file.is_file():
            logger.info("%s: already evaluated (%s), not re-run", spec.name, metrics_file)
            return json.loads(metrics_file.read_text())
        self.train(spec)
        logger.info("%s: evaluating", spec.name)
        bundle_run("evaluating", config_file=[*files, self.evaluate_config], **self.run_arguments, **overrides)
        return json.loads(metrics_file.read_text())


def headline_metrics(metrics: Mapping, model: str = "ensemble") -> dict[str, dict[str, float]]:
    """``{level: {accuracy, precision, recall, specificity, f1, auc}}`` (macro averages) from a metrics.json."""
    out = {}
    for level in LEVELS:
        entry = metrics[level][model]
        values = {"accuracy": entry["accuracy"], **{m: entry["macro"][m] for m in METRIC_NAMES[1:]}}
        out[level] = {k: (float("nan") if v is None else float(v)) for k, v in values.items()}
    return out


def mean_and_std(rows: Sequence[Mapping[str, Mapping[str, float]]]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (n-1) of each level's metrics, ignoring NaN (e.g. AUC undefined)."""
    mean: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    for level in LEVELS:
        mean[level], std[level] = {}, {}
        for name in METRIC_NAMES:
            values = [r[level][name] for r in rows if not math.isnan(r[level][name])]
            m = sum(values) / len(values) if values else None
            mean[level][name] = m
            std[level][name] = (
                math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if m is not None and len(values) > 1
                else (0.0 if values else None)
            )  # fmt: skip
    return mean, std


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def format_metric(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def metrics_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]], level: str) -> str:
    """A Markdown table: one line per run, one column per headline metric, at ``level``."""
    table = [[name] + [format_metric(row[level][m]) for m in METRIC_NAMES] for name, row in rows.items()]
    return "\n".join(markdown_table(["run", *METRIC_NAMES], table))


def write_summary(output_dir: Path, summary: dict, markdown: str) -> dict:
    """Write an experiment's ``summary.json`` (NaN as null) and ``summary.md`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2))
    (output_dir / "summary.md").write_text(markdown)
    logger.info("wrote %s and %s", output_dir / "summary.json", output_dir / "summary.md")
    return summary


def cross_validate(
    n_folds: int = 5,
    output_dir: str | Path = "cross_validation",
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Patient-grouped, grade-stratified k-fold: train and evaluate fold k with ``split_protocol=kfold``.

    Every patient is tested exactly once; each fold's checkpoint is chosen on validation patients carved
    from its own training patients. ``output_dir/summary.json`` holds each fold's test metrics (slice and
    patient level, ensemble) and their mean and sample std.
    """
    experiment = Experiment.from_context(output_dir, config_file, overrides)
    folds = []
    for k in range(int(n_folds)):
        metrics = experiment.run(RunSpec(f"fold_{k}", {"split_protocol": "kfold", "fold": k, "n_folds": int(n_folds)}))
        folds.append({"fold": k, "n_test_slices": metrics["n_slices"], "n_test_patients": metrics["n_patients"],
                      **headline_metrics(metrics)})  # fmt: skip
    mean, std = mean_and_std(folds)
    summary = {"experiment": "cross_validation", "n_folds": int(n_folds), "model": "ensemble (mean of branches)",
               "std": "sample standard deviation over folds", "folds": folds, "mean": mean, "std_dev": std}  # fmt: skip
    lines = [f"# {n_folds}-fold patient-grouped cross-validation", ""]
    for level in LEVELS:
        rows = {f"fold {f['fold']}": f for f in folds}
        lines += [f"## {level.replace('_', ' ')}", "", metrics_table(rows, level)]
        cells = " | ".join(format_metric(mean[level][m], std[level][m]) for m in METRIC_NAMES)
        lines.append(f"| **mean ± std** | {cells} |")
        lines.append("")
    return write_summary(experiment.output_dir, summary, "\n".join(lines))


def compare_protocols(
    output_dir: str | Path = "protocol_comparison",
    protocols: Sequence[str] = ("slice", "patient"),
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """The same model trained and tested under each split protocol on the same records.

    ``slice`` is the paper's split: neighbouring slices of one patient fall on both sides, so its test
    accuracy measures memorised patients as much as grading; ``patient`` keeps every patient on one side.
    """
    experiment = Experiment.from_context(output_dir, config_file, overrides)
    rows = {}
    for protocol in protocols:
        metrics = experiment.run(RunSpec(f"{protocol}_split", {"split_protocol": protocol}))
        rows[protocol] = {"n_test_slices": metrics["n_slices"], "n_test_patients": metrics["n_patients"],
                          **headline_metrics(metrics)}  # fmt: skip
    summary = {"experiment": "protocol_comparison", "model": "ensemble (mean of branches)", "runs": rows}
    lines = ["# Split protocol comparison (same data, same model, same settings)", ""]
    for level in LEVELS:
        lines += [f"## test {level.replace('_', ' ')}", "", metrics_table(rows, level), ""]
    return write_summary(experiment.output_dir, summary, "\n".join(lines))


def _value_name(value: Any) -> str:
    return "none" if value is None else str(value)


def sweep(
    sweep_key: str,
    sweep_values: Sequence[Any],
    output_dir: str | Path = "sweep",
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """One full run per value of one config key (``synergic_lambda`` 3..8, ``gaussian_kernel`` none/3/5/7...).

    Writes ``summary.json``, ``summary.md`` and ``sweep.png`` (test accuracy and macro AUC against the
    value, slice and patient level: the paper's Figure 7).
    """
    if isinstance(sweep_values, str | int | float) or sweep_values is None:
        sweep_values = [sweep_values]
    experiment = Experiment.from_context(output_dir, config_file, overrides)
    points = []
    for value in sweep_values:
        metrics = experiment.run(RunSpec(f"{sweep_key}={_value_name(value)}", {sweep_key: value}))
        points.append({"value": value, **headline_metrics(metrics)})
    summary = {"experiment": "sweep", "key": sweep_key, "model": "ensemble (mean of branches)", "points": points}
    rows = {f"{sweep_key}={_value_name(p['value'])}": p for p in points}
    lines = [f"# Sweep of `{sweep_key}`", ""]
    for level in LEVELS:
        lines += [f"## test {level.replace('_', ' ')}", "", metrics_table(rows, level), ""]
    lines += ["![sweep](sweep.png)", ""]
    write_summary(experiment.output_dir, summary, "\n".join(lines))
    plot_sweep(summary, experiment.output_dir / "sweep.png")
    return summary


def plot_sweep(summary: Mapping, path: str | Path) -> Path:
    """Test accuracy and macro AUC against the swept value (categorical axis, so ``none`` fits)."""
    labels = [_value_name(p["value"]) for p in summary["points"]]
    fig, axes = new_figure(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, metric in zip(axes, ("accuracy", "auc"), strict=True):
        for level, marker in zip(LEVELS, ("o", "s"), strict=True):
            values = [p[level][metric] for p in summary["points"]]
            values = [float("nan") if v is None else v for v in values]
            ax.plot(labels, values, marker=marker, label=level.replace("_", " "))
        ax.set_title(f"test {metric}")
        ax.set_xlabel(summary["key"])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def compare_models(
    variants: Sequence[Mapping[str, Any]],
    output_dir: str | Path = "comparison",
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Runs of several models on the same splits (the paper's Table 2): SDL and single-network baselines.

    Each variant is ``{"name": ..., "config_file": [extra files, e.g. baseline.yaml], "overrides": {...}}``;
    the extra files are looked up beside the first config file when given by bare name.
    """
    experiment = Experiment.from_context(output_dir, config_file, overrides)
    config_dir = Path(experiment.config_files[0]).parent
    rows = {}
    for variant in variants:
        extra = variant.get("config_file") or []
        extra = [extra] if isinstance(extra, str) else list(extra)
        extra = [str(config_dir / f) if not Path(f).exists() and (config_dir / f).exists() else f for f in extra]
        metrics = experiment.run(RunSpec(variant["name"], dict(variant.get("overrides") or {}), extra))
        rows[variant["name"]] = {"n_test_slices": metrics["n_slices"], "n_test_patients": metrics["n_patients"],
                                 **headline_metrics(metrics)}  # fmt: skip
    summary = {"experiment": "comparison", "model": "ensemble (mean of branches) for SDL", "runs": rows}
    lines = ["# Model comparison on the same splits", ""]
    for level in LEVELS:
        lines += [f"## test {level.replace('_', ' ')}", "", metrics_table(rows, level), ""]
    return write_summary(experiment.output_dir, summary, "\n".join(lines))
