"""`run tune`: an Optuna search over whole bundle runs, scored on inner folds of the training patients.

Why it is built this way:

- **A trial is ordinary runs.** Trial ``n`` is one ``run training`` per inner fold, in ``OUT/trials/<n>/fold_<k>/``
  with its exact config files and overrides in ``run.json`` (``scripts.experiments.Experiment``), so any trial
  can be re-run, inspected or resumed like every other run; ``OUT/trials/<n>/run.json`` holds the trial's
  settings and, once it ends, its state and per-fold values.
- **The test patients stay out.** tune.yaml makes a trial's split fold ``inner_fold`` of ``inner_folds``
  patient-grouped folds of the outer split's training and validation patients
  (:func:`scripts.splits.inner_fold_split`); the outer test part is dropped. Only ``--final true`` tests, once,
  the best settings, in an ordinary run on the outer split.
- **The objective is patient level**: by default ``val_patient_acc`` (or ``val_patient_auc``, macro one-vs-rest
  AUC), patients graded by the mean of their slices' probabilities (`scripts.engine_metrics.PatientLevelMetric`),
  taken at the last validated epoch of each inner fold (the best epoch would reward noisy settings) and
  averaged over the folds.
- **Pruning crosses the folds.** :class:`TrialPruningHandler` reports the running objective (finished folds'
  values and the current fold's latest, averaged) at steps numbered on across the folds, so the pruner compares
  trials fold by fold and epoch by epoch.
- **Parallel and resumable by Optuna alone.** The study lives in ``--storage`` (an SQLAlchemy URL; default
  ``sqlite:///OUT/study.db``). Every process that names the same study shares it, on one machine or several
  (a PostgreSQL/MySQL URL), and the same command run again adds ``n_trials`` more. Heartbeats mark a trial
  whose process died as failed and queue its settings again, so a killed process loses one trial at most.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from scripts.checkpoints import atomic_write_text
from scripts.experiments import LEVELS, Experiment, RunSpec, format_metric, headline_metrics, metrics_table
from scripts.reports import markdown_table

logger = logging.getLogger(__name__)

SEARCH_TYPES = ("float", "int", "categorical")


# ---- the search space --------------------------------------------------------------------------------
def load_search_space(
    search_space: Mapping[str, Any] | str | None, search_space_file: str | None = None
) -> dict[str, dict]:
    """``search_space`` (a mapping or a YAML file), updated by ``search_space_file``, checked.

    Each entry maps a config id (``synergic_lambda``, ``train#dataloader#batch_size``...) to
    ``{type: float|int, low, high[, log][, step]}`` or ``{type: categorical, choices: [...]}``; an entry set to
    null in the file drops that key from the search.
    """
    import yaml

    def read(source: Mapping[str, Any] | str | None) -> dict:
        if source is None:
            return {}
        if isinstance(source, str):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"search space file {path} does not exist")
            source = yaml.safe_load(path.read_text()) or {}
        if not isinstance(source, Mapping):
            raise ValueError(f"a search space is a mapping of config keys to ranges, got {type(source).__name__}")
        return dict(source)

    space = read(search_space)
    for key, spec in read(search_space_file).items():
        if spec is None:
            space.pop(key, None)
        else:
            space[key] = spec
    if not space:
        raise ValueError("the search space is empty: give --search_space or --search_space_file")
    for key, spec in space.items():
        kind = spec.get("type", "categorical" if "choices" in spec else "float") if isinstance(spec, Mapping) else None
        if kind not in SEARCH_TYPES:
            raise ValueError(f"search space entry {key}: {spec!r}; expected a mapping with type in {SEARCH_TYPES}")
        needed = ("choices",) if kind == "categorical" else ("low", "high")
        missing = [n for n in needed if n not in spec]
        if missing:
            raise ValueError(f"search space entry {key} ({kind}) lacks {missing}")
    return {key: dict(spec) for key, spec in space.items()}


def suggest(trial: Any, key: str, spec: Mapping[str, Any]) -> Any:
    """Draw one value of ``key`` for ``trial`` (YAML may give ``1e-5`` as text, hence the casts)."""
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    if kind == "categorical":
        return trial.suggest_categorical(key, list(spec["choices"]))
    log = bool(spec.get("log", False))
    if kind == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)), log=log)
    step = spec.get("step")
    return trial.suggest_float(
        key, float(spec["low"]), float(spec["high"]), step=None if step is None else float(step), log=log
    )


# ---- what tune.yaml puts into each trial's run ---------------------------------------------------------
def trial_splits(
    records: Sequence[dict], *, inner_fold: int | None = None, inner_folds: int = 3, **split_options: Any
) -> dict[str, list[dict]]:
    """The ordinary split (train.yaml's ``splits``, whose options pass through), or with ``inner_fold`` set, that
    inner fold of its training patients."""
    from scripts.splits import inner_fold_split, make_splits

    outer = make_splits(records, **split_options)
    if inner_fold is None:
        return outer
    return inner_fold_split(outer, fold=int(inner_fold), n_folds=int(inner_folds), seed=split_options.get("seed", 0))


@dataclass
class _ActiveTrial:
    """The trial the tune loop is running now, as the pruning handler inside its runs sees it."""

    trial: Any
    objective: str
    fold_values: list[float] = field(default_factory=list)
    step_offset: int = 0  # trainer epochs of the finished folds
    epoch_values: dict[int, float] = field(default_factory=dict)  # the current fold's validated epochs
    last_epoch: int = 0
    pruned_at: int | None = None


_ACTIVE: _ActiveTrial | None = None


class TrialPruningHandler:
    """After each validation, report the trial's running objective to Optuna; stop the run if it says prune.

    tune.yaml appends it to ``train#handlers``, after the `ValidationHandler`, so at the trainer's epoch end the
    evaluator has scored the epoch. It does what optuna-integration's ``PyTorchIgnitePruningHandler`` does, with
    two differences: that handler reports the metric at the trainer's own epoch, which every inner fold repeats
    (Optuna keeps only the first report of a step, so no fold after the first could be pruned), and it raises
    ``TrialPruned`` inside the engine, which MONAI's handlers log as an error with a traceback. This one reports at
    step (epochs of finished folds + epoch) and ends the run with ``trainer.terminate()``; the tune loop then
    raises ``TrialPruned``. Outside a trial (the final run, ``run training`` with tune.yaml) it does nothing.
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        active = _ACTIVE
        if active is None:
            return
        epoch = engine.state.epoch
        active.last_epoch = epoch
        if self.evaluator.state.epoch != epoch:  # not a validation epoch (val_interval > 1)
            return
        metrics = self.evaluator.state.metrics
        if active.objective not in metrics:
            known = sorted(metrics)
            raise KeyError(f"objective {active.objective!r} is not a validation metric; the evaluator has {known}")
        value = float(metrics[active.objective])
        active.epoch_values[epoch] = value
        running = (sum(active.fold_values) + value) / (len(active.fold_values) + 1)
        step = active.step_offset + epoch
        active.trial.report(running, step)
        if active.trial.should_prune():
            active.pruned_at = step
            logger.info("trial %d pruned at step %d (%s running mean %.4f)", active.trial.number, step,
                        active.objective, running)  # fmt: skip
            engine.terminate()


# ---- the study ---------------------------------------------------------------------------------------
def default_storage(output_dir: str | Path) -> str:
    return f"sqlite:///{(Path(output_dir) / 'study.db').resolve()}"


def storage_label(url: str) -> str:
    """The URL with any password hidden, for logs and summaries."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, heartbeat_interval: int = 60, attempts: int = 5) -> Any:
    """Optuna's RDB storage with heartbeats, retried: processes started together on a new SQLite file race to
    create its tables, and the loser sees "table already exists" once."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs: dict = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise
            logger.info("storage %s not ready (%s); retrying", storage_label(url), type(e).__name__)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def open_study(
    storage: str, study_name: str, direction: str, objective: str, inner_folds: int, sampler: Any, pruner: Any
) -> Any:
    """Create the study or join it; a study scored differently cannot be continued (its values would mix)."""
    import optuna

    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=study_name,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        stored = study.direction.name.lower()
        raise ValueError(f"study {study_name} in {storage_label(storage)} is to {stored}, not to {direction}")
    for key, value in (("objective", objective), ("inner_folds", inner_folds)):
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, value)
        elif stored != value:
            raise ValueError(
                f"study {study_name} in {storage_label(storage)} was run with {key}={stored!r}, not {value!r}: its "
                "values are not comparable; give another --study_name or --storage"
            )
    return study


def _remove_checkpoints(run_dir: Path) -> None:
    """A trial's weights are never used again and an AlexNet fold writes about 1 GB of them."""
    for path in (run_dir / "models").glob("*.pt"):
        path.unlink(missing_ok=True)


def _write_json(path: Path, content: Mapping) -> None:
    """Written atomically: parallel processes read and rewrite these files."""
    atomic_write_text(json.dumps(content, indent=2, default=str), path)


def run_trial(
    trial: Any,
    experiment: Experiment,
    search_space: Mapping[str, Mapping],
    objective: str,
    inner_folds: int,
    keep_checkpoints: bool = False,
) -> float:
    """One trial: a ``run training`` per inner fold; the mean over folds of ``objective`` at the last validation."""
    import optuna

    global _ACTIVE
    params = {key: suggest(trial, key, spec) for key, spec in search_space.items()}
    trial_dir = experiment.output_dir / "trials" / str(trial.number)
    runs = Experiment(experiment.config_files, experiment.overrides, trial_dir, experiment.run_arguments)
    record: dict[str, Any] = {
        "trial": trial.number, "params": params, "objective": objective, "inner_folds": inner_folds,
        "config_file": experiment.config_files, "overrides": {**experiment.overrides, **params}, "state": "RUNNING",
    }  # fmt: skip
    trial_dir.mkdir(parents=True, exist_ok=True)
    _write_json(trial_dir / "run.json", record)
    active = _ActiveTrial(trial, objective)
    _ACTIVE = active
    try:
        for k in range(inner_folds):
            active.epoch_values, active.last_epoch = {}, 0
            spec = RunSpec(f"fold_{k}", {**params, "inner_fold": k, "inner_folds": inner_folds})
            try:
                runs.train(spec)
            finally:
                if not keep_checkpoints:
                    _remove_checkpoints(trial_dir / spec.name)
            if active.pruned_at is not None:
                record.update(state="PRUNED", pruned_at_step=active.pruned_at, fold_values=active.fold_values)
                raise optuna.TrialPruned(f"pruned at step {active.pruned_at} (inner fold {k})")
            if not active.epoch_values:
                raise RuntimeError(f"trial {trial.number} fold {k}: no validation epoch (val_interval > epochs?)")
            active.fold_values.append(active.epoch_values[max(active.epoch_values)])
            active.step_offset += active.last_epoch
            logger.info("trial %d inner fold %d/%d: %s %.4f", trial.number, k + 1, inner_folds, objective,
                        active.fold_values[-1])  # fmt: skip
    except optuna.TrialPruned:
        raise
    except BaseException:
        record["state"] = "FAIL"
        raise
    finally:
        _ACTIVE = None
        _write_json(trial_dir / "run.json", record)
    value = sum(active.fold_values) / len(active.fold_values)
    trial.set_user_attr("fold_values", active.fold_values)
    record.update(state="COMPLETE", value=value, fold_values=active.fold_values)
    _write_json(trial_dir / "run.json", record)
    return value


# ---- results -----------------------------------------------------------------------------------------
def write_best_yaml(study: Any, path: Path) -> Path:
    """The best trial's values of the searched keys: an override file for ``run training`` (last config file)."""
    import yaml

    best = study.best_trial
    header = (
        f"# Best settings of Optuna study {study.study_name!r}: trial {best.number}, "
        f"{study.user_attrs.get('objective', 'objective')} = {best.value:.4f} "
        f"(mean over {study.user_attrs.get('inner_folds', '?')} inner folds of the training patients).\n"
        "# Give it as the last config file: --config_file \"['bundle/configs/train.yaml','<this file>']\"\n"
    )
    return atomic_write_text(
        header + yaml.safe_dump(dict(best.params), sort_keys=False, default_flow_style=False), path
    )


def write_plots(study: Any, output_dir: Path, objective: str) -> list[str]:
    """Optuna's own matplotlib plots; one that the study cannot support yet (e.g. importances of one trial) is
    left out with its reason in the log."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import optuna.visualization.matplotlib as plots

    from scripts.reports import save_figure

    params = {key for t in study.get_trials(deepcopy=False) for key in t.params}
    makers = {
        "optimization_history": lambda: plots.plot_optimization_history(study, target_name=objective),
        "param_importances": lambda: plots.plot_param_importances(study, target_name=objective),
        "synergic_lambda_slice": lambda: (
            plots.plot_slice(study, params=["synergic_lambda"], target_name=objective)
            if "synergic_lambda" in params
            else None
        ),
        "intermediate_values": lambda: plots.plot_intermediate_values(study),
    }
    written = []
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these plots experimental
                axes = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            logger.info("plot %s left out: %s", name, e)
            continue
        if axes is None:
            continue
        figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        figure.tight_layout()
        temporary = save_figure(figure, output_dir / f".{name}.{os.getpid()}.png")
        os.replace(temporary, output_dir / f"{name}.png")
        written.append(f"{name}.png")
    return written


def _trial_row(trial: Any) -> dict:
    return {"trial": trial.number, "value": trial.value, "fold_values": trial.user_attrs.get("fold_values"),
            "params": dict(trial.params)}  # fmt: skip


def write_results(study: Any, output_dir: Path, storage: str, final: Mapping | None = None, top: int = 10) -> dict:
    """``best.yaml``, ``summary.json``, ``summary.md`` and the plots, from everything in the storage now."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    objective = study.user_attrs.get("objective", "objective")
    summary: dict[str, Any] = {
        "experiment": "tune", "study_name": study.study_name, "storage": storage_label(storage),
        "objective": objective, "direction": study.direction.name.lower(),
        "inner_folds": study.user_attrs.get("inner_folds"),
        "trials": dict(Counter(t.state.name for t in trials)), "best": None, "top": [], "plots": [], "final": final,
    }  # fmt: skip
    lines = [f"# Optuna study `{study.study_name}`", ""]
    lines.append(
        f"Objective: `{objective}` ({summary['direction']}), the mean over {summary['inner_folds']} inner folds of "
        f"the training patients, at each fold's last validated epoch. Storage `{summary['storage']}`. Trials: "
        + ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary["trials"].items()))
        + "."
    )
    lines.append("")
    if complete:
        reverse = summary["direction"] == "maximize"
        ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
        summary["best"] = _trial_row(study.best_trial)
        summary["top"] = [_trial_row(t) for t in ranked]
        write_best_yaml(study, output_dir / "best.yaml")
        keys = sorted({k for t in ranked for k in t.params})
        lines += [f"## Best trials (top {len(ranked)})", "", "`best.yaml` holds the first row's settings.", ""]
        rows = [
            [t.number, f"{t.value:.4f}", ", ".join(f"{v:.3f}" for v in t.user_attrs.get("fold_values", []))]
            + [_format_param(t.params.get(k)) for k in keys]
            for t in ranked
        ]
        lines += markdown_table(["trial", objective, "per inner fold", *keys], rows)
        lines.append("")
    else:
        lines += ["No trial has completed yet, so there is no `best.yaml`.", ""]
    if final:
        lines += [f"## Final run `{final['run']}`: best settings, tested once on the test split", ""]
        for level in LEVELS:
            lines += [f"### test {level.replace('_', ' ')}", "", metrics_table({final["run"]: final}, level), ""]
    summary["plots"] = write_plots(study, output_dir, objective)
    if summary["plots"]:  # last, so that `run report`, which links copies of them, puts them under this heading
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in summary["plots"]] + [""]
    _write_json(output_dir / "summary.json", summary)
    atomic_write_text("\n".join(lines), output_dir / "summary.md")
    logger.info("wrote %s and %d plot(s) in %s", "summary.md", len(summary["plots"]), output_dir)
    return summary


def _format_param(value: Any) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.4g}"
    return "none" if value is None else str(value)


# ---- the run id ----------------------------------------------------------------------------------------
def tune(
    n_trials: int = 20,
    output_dir: str | Path = "tune",
    storage: str | None = None,
    study_name: str = "sdl_glioma",
    search_space: Mapping[str, Any] | str | None = None,
    search_space_file: str | None = None,
    objective: str = "val_patient_acc",
    direction: str = "maximize",
    inner_folds: int = 3,
    final: bool | str = False,
    sampler: Any = None,
    pruner: Any = None,
    timeout: float | None = None,
    keep_checkpoints: bool | str = False,
    outer_n_folds: int | None = None,
    config_file: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Run ``n_trials`` trials of the study (more in other processes sharing it), then write the results;
    with ``final``, train the best settings on the outer split and evaluate them once on its test part.

    ``outer_n_folds`` is the run's ``n_folds``, for an outer ``split_protocol kfold`` (tuning inside fold
    ``fold`` of a cross-validation)."""
    from scripts.flags import as_flag

    experiment = Experiment.from_context(output_dir, config_file, overrides)
    if outer_n_folds is not None:  # an experiment key (cross_validation's), yet an outer kfold split needs it
        experiment.overrides["n_folds"] = int(outer_n_folds)
    output_dir = experiment.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    space = load_search_space(search_space, search_space_file)
    inner_folds, direction = int(inner_folds), str(direction).lower()
    if inner_folds < 2:
        raise ValueError(f"inner_folds must be at least 2, got {inner_folds}")
    clashing = sorted(set(space) & set(experiment.overrides))
    if clashing:
        logger.warning("searched keys %s are also given as overrides: each trial's drawn value wins", clashing)
    storage = storage or default_storage(output_dir)
    study = open_study(storage, study_name, direction, objective, inner_folds, sampler, pruner)
    marker = {"study_name": study_name, "storage": storage_label(storage), "objective": objective,
              "direction": direction, "inner_folds": inner_folds, "search_space": space}  # fmt: skip
    _write_json(output_dir / "study.json", marker)  # also tells `run report` that trials/ holds trial runs
    logger.info("study %s in %s: %d trial(s) so far; running %s more", study_name, storage_label(storage),
                len(study.trials), n_trials)  # fmt: skip
    keep = as_flag(keep_checkpoints)
    study.optimize(
        lambda trial: run_trial(trial, experiment, space, objective, inner_folds, keep),
        n_trials=int(n_trials),
        timeout=None if timeout is None else float(timeout),
        gc_after_trial=True,
    )
    summary = write_results(study, output_dir, storage, final=_final_row(output_dir, study))
    if as_flag(final):
        if summary["best"] is None:
            raise RuntimeError("--final true needs a completed trial; the study has none yet")
        best = summary["best"]
        name = f"final_trial_{best['trial']}"  # its own folder: a later, better trial gets its own final run
        (output_dir / name).mkdir(parents=True, exist_ok=True)
        best_file = output_dir / name / "best.yaml"
        best_file.write_text((output_dir / "best.yaml").read_text())
        metrics = experiment.run(RunSpec(name, dict(best["params"]), [str(best_file)]))
        logger.info("final run %s: test patient accuracy %s", name,
                    format_metric(headline_metrics(metrics)["patient_level"]["accuracy"]))  # fmt: skip
        summary = write_results(study, output_dir, storage, final=_final_row(output_dir, study))
    return summary


def _final_row(output_dir: Path, study: Any) -> dict | None:
    """The test metrics of the best trial's final run, if one was made (by this process or an earlier one)."""
    try:
        number = study.best_trial.number
    except ValueError:  # no completed trial
        return None
    metrics_file = output_dir / f"final_trial_{number}" / "eval" / "metrics.json"
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text())
    return {"run": metrics_file.parent.parent.name, "trial": number, **headline_metrics(metrics)}
