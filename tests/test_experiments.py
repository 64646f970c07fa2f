"""Experiments as bundle run ids: k-fold, protocol comparison, sweeps and model comparison, tiny and real.

The run ids run as users run them (`python -m monai.bundle run <id>` from the repository root) on a tiny
generated DICOM tree with a small network, 1 epoch and 32x32 images; the report test builds on their
output folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import bundle_run, tiny_datalist
from scripts.experiments import mean_and_std, parse_bundle_command_line

TINY = [
    "--backbone", "resnet18", "--hidden_size", "16", "--image_size", "32",
    "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
]  # fmt: skip


def run_configs(run_id: str, config_files: list[str], *overrides: str) -> str:
    """`run RUN_ID` with config files of bundle/configs given by name."""
    return bundle_run(run_id, "[" + ",".join(f"'bundle/configs/{f}'" for f in config_files) + "]", *overrides)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    datalist = tiny_datalist(tmp_path_factory.mktemp("experiments_data"), n_patients_per_grade=6, seed=3)
    return ["--datalist", str(datalist)]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_command_line_is_parsed_as_monai_bundle_parses_it():
    run_args, overrides = parse_bundle_command_line(
        ["run", "cross_validation", "--config_file", "['a.yaml','b.yaml']", "--n_folds", "2",
         "--train#trainer#max_epochs=1", "--sweep_values", "[None,3]", "--tracking", "mlflow", "--flag"]
    )  # fmt: skip
    assert run_args == {"run_id": "cross_validation", "config_file": ["a.yaml", "b.yaml"], "tracking": "mlflow"}
    assert overrides == {"n_folds": 2, "train#trainer#max_epochs": 1, "sweep_values": [None, 3], "flag": True}


def test_mean_and_std_ignore_undefined_values():
    rows = [
        {level: {m: v for m in ("accuracy", "precision", "recall", "specificity", "f1", "auc")} for level in
         ("slice_level", "patient_level")} for v in (0.5, 0.7)
    ]  # fmt: skip
    rows[1]["patient_level"]["auc"] = float("nan")
    mean, std = mean_and_std(rows)
    assert mean["slice_level"]["accuracy"] == pytest.approx(0.6)
    assert std["slice_level"]["accuracy"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert mean["patient_level"]["auc"] == 0.5 and std["patient_level"]["auc"] == 0.0


def test_cross_validation_writes_per_fold_metrics_and_their_mean(data_args, runs_dir):
    out = runs_dir / "cv"
    run_configs(
        "cross_validation", ["train.yaml", "cross_validation.yaml"], *data_args, *TINY,
        "--n_folds", "2", "--output_dir", str(out), "--train#trainer#max_epochs", "1",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    tested = []
    for fold in summary["folds"]:
        run = out / f"fold_{fold['fold']}"
        assert (run / "models" / "model.pt").is_file() and list((run / "logs").glob("events.out.tfevents*"))
        patients = json.loads((run / "eval" / "metrics.json").read_text())["n_patients"]
        assert fold["n_test_patients"] == patients
        rows = (run / "eval" / "patients.csv").read_text().splitlines()[1:]
        tested += [row.split(",")[0] for row in rows]
    assert len(tested) == len(set(tested)) == 18, "every patient is tested exactly once"
    accuracies = [f["slice_level"]["accuracy"] for f in summary["folds"]]
    assert summary["mean"]["slice_level"]["accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert set(summary["std_dev"]["patient_level"]) == {"accuracy", "precision", "recall", "specificity", "f1", "auc"}
    assert "mean ± std" in (out / "summary.md").read_text()

    # The same command again finds every fold evaluated and re-runs nothing.
    log = run_configs(
        "cross_validation", ["train.yaml", "cross_validation.yaml"], *data_args, *TINY,
        "--n_folds", "2", "--output_dir", str(out),
    )  # fmt: skip
    assert log.count("already evaluated") == 2 and "Engine run resuming" not in log


def test_protocol_comparison_and_sweep_write_tables_and_plot(data_args, runs_dir):
    out = runs_dir / "protocols"
    run_configs("protocol_comparison", ["train.yaml", "protocol_comparison.yaml"], *data_args, *TINY,
               "--output_dir", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"slice", "patient"}
    assert json.loads((out / "slice_split" / "run.json").read_text())["overrides"]["split_protocol"] == "slice"

    out = runs_dir / "lambda"
    run_configs("sweep", ["train.yaml", "sweep.yaml"], *data_args, *TINY, "--sweep_key", "synergic_lambda",
               "--sweep_values", "[3,8]", "--output_dir", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [p["value"] for p in summary["points"]] == [3, 8]
    assert (out / "synergic_lambda=8" / "eval" / "metrics.json").is_file()
    assert (out / "sweep.png").stat().st_size > 1000


def test_unknown_fold_and_empty_validation_are_clear_errors():
    from scripts.splits import make_splits

    records = [{"image": f"{p}_{i}", "label": p % 3, "patient_id": str(p)} for p in range(6) for i in range(2)]
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        make_splits(records, protocol="kfold", fold=3, n_folds=3)
    with pytest.raises(ValueError, match="left no validation slices"):  # 2 patients per grade, 1 per fold
        make_splits(records, protocol="kfold", fold=0, n_folds=2)


def test_comparison_runs_sdl_and_a_baseline_on_the_same_split(data_args, runs_dir):
    out = runs_dir / "comparison"
    variants = "[{'name': 'sdl', 'overrides': {}}, {'name': 'single', 'config_file': 'baseline.yaml'}]"
    run_configs("comparison", ["train.yaml", "comparison.yaml"], *data_args, *TINY, "--variants", variants,
               "--output_dir", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"sdl", "single"}
    assert summary["runs"]["sdl"]["n_test_slices"] == summary["runs"]["single"]["n_test_slices"]
    sdl = json.loads((out / "sdl" / "eval" / "metrics.json").read_text())
    single = json.loads((out / "single" / "eval" / "metrics.json").read_text())
    assert set(sdl["slice_level"]) == {"ensemble", "branch1", "branch2"}
    assert set(single["slice_level"]) == {"ensemble", "branch1"}  # one network, no partner
    sdl_patients = (out / "sdl" / "eval" / "patients.csv").read_text().splitlines()[1:]
    single_patients = (out / "single" / "eval" / "patients.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in sdl_patients] == [r.split(",")[0] for r in single_patients]


def test_report_links_only_existing_figures_built_from_the_runs(data_args, runs_dir, tmp_path):
    """After the experiments above: one report over all of them, from their logs and metrics only."""
    import re

    if not (runs_dir / "cv" / "summary.json").is_file():
        pytest.skip("needs the cross-validation run of this module")
    out = tmp_path / "report"
    run_configs("report", ["train.yaml", "report.yaml"], "--runs_dir", str(runs_dir), "--output_dir", str(out))
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out / link).is_file() for link in links), [x for x in links if not (out / x).is_file()]
    assert "figures/cv_fold_0_curves.png" in links  # per-branch / synergic training curves of a fold
    assert any(link.endswith("_slice_level_confusion.png") for link in links)
    assert "mean ± std" in text and "Table 2" in text and "Table 3" in text
    if (runs_dir / "lambda" / "summary.json").is_file():
        assert "figures/lambda_sweep.png" in links


def test_report_on_a_folder_without_runs_is_a_clear_error(tmp_path):
    from scripts.experiment_report import write_report

    with pytest.raises(ValueError, match="no runs under"):
        write_report(tmp_path, tmp_path / "out")
