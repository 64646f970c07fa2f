"""`run tune`: an Optuna study of tiny bundle runs, as users start it (`python -m monai.bundle run tune` from the
repository root), plus the pieces it relies on (inner folds, the patient-level metric, the search space).

The study runs on a small generated DICOM tree with a small network, 1 epoch, 32x32 images and 2 inner folds.
Which trial is pruned is forced with a pruner given on the command line, an Optuna `BasePruner` built in the
config expression (tune.yaml imports optuna for such expressions) that prunes trial 1 at its first report:
a real pruner's choice depends on the trials' values, which a 1-epoch run on 12 patients makes arbitrary.
The bundle runs get OMP_NUM_THREADS=1: two torch threads per process on two shared cores made a tiny epoch
ten times slower here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, bundle_run, tiny_datalist

optuna = pytest.importorskip("optuna")
yaml = pytest.importorskip("yaml")

CONFIGS = "['bundle/configs/train.yaml','bundle/configs/tune.yaml']"
TINY = [
    "--backbone", "resnet18", "--image_size", "32", "--batch_size", "4", "--num_workers", "0", "--epochs", "1",
    "--inner_folds", "2",
]  # fmt: skip
PRUNE_TRIAL_1 = (
    "$type('PruneTrial1', (optuna.pruners.BasePruner,), {'prune': lambda self, study, trial: trial.number == 1})()"
)
# tune.yaml's space, narrowed to tiny values, minus the learning rate, plus a key it does not search
SEARCH_SPACE_FILE = """
hidden_size: {type: categorical, choices: [8, 16]}
gaussian_kernel: {type: categorical, choices: [null, 3]}
learning_rate: null
rotate_degrees: {type: int, low: 0, high: 10}
"""
SEARCHED = {"synergic_lambda", "fusion", "hidden_size", "same_fraction", "gaussian_kernel", "rotate_degrees"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tune_data")
    datalist = tiny_datalist(root, n_patients_per_grade=4, seed=5)
    space = root / "space.yaml"
    space.write_text(SEARCH_SPACE_FILE)
    return ["--datalist", str(datalist), "--search_space_file", str(space)]


def load_trials(out: Path) -> list:
    study = optuna.load_study(study_name="sdl_glioma", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def test_inner_folds_hold_only_the_outer_training_patients():
    from scripts.splits import inner_fold_split, make_splits

    records = [{"image": f"{p}_{i}", "label": p % 3, "patient_id": f"P{p:02d}"} for p in range(15) for i in range(3)]
    outer = make_splits(records, val_fraction=0.2, test_fraction=0.2, seed=1)
    patients = {part: {r["patient_id"] for r in outer[part]} for part in outer}
    pool = patients["train"] | patients["validation"]
    validated = []
    for k in range(3):
        inner = inner_fold_split(outer, fold=k, n_folds=3, seed=1)
        train = {r["patient_id"] for r in inner["train"]}
        validation = {r["patient_id"] for r in inner["validation"]}
        assert inner["test"] == [] and not (train | validation) & patients["test"]
        assert train | validation == pool and not train & validation
        assert {r["label"] for r in inner["validation"]} == {0, 1, 2}, "grade-stratified"
        validated += sorted(validation)
    assert sorted(validated) == sorted(pool), "every training patient validates exactly once"

    leaky = make_splits(records, protocol="slice", val_fraction=0.2, test_fraction=0.2, seed=1)
    with pytest.raises(ValueError, match="patient-level outer split"):
        inner_fold_split(leaky, fold=0, n_folds=3)

    # tune.yaml's split: the usual one without inner_fold; inside outer fold 1 of a cross-validation with it
    from scripts.tune import trial_splits

    kfold = {"protocol": "kfold", "fold": 1, "n_folds": 5, "val_fraction": 0.2, "seed": 1}
    assert trial_splits(records, **kfold) == make_splits(records, **kfold)
    outer_test = {r["patient_id"] for r in make_splits(records, **kfold)["test"]}
    inner = trial_splits(records, **kfold, inner_fold=0, inner_folds=2)
    assert inner["test"] == [] and not {r["patient_id"] for r in inner["train"] + inner["validation"]} & outer_test


def test_patient_level_metric_grades_patients_by_their_mean_probabilities():
    import torch
    from scripts.engine_metrics import PatientLevelMetric

    # P1 (grade 0): one confident wrong slice, two slightly right ones -> mean says grade 1 (wrong);
    # P2 (grade 1): right. Slice accuracy would be 3/4, patient accuracy is 1/2.
    rows = [
        ("P1", [0.05, 0.95, 0.0], 0), ("P1", [0.55, 0.45, 0.0], 0), ("P1", [0.55, 0.45, 0.0], 0),
        ("P2", [0.2, 0.7, 0.1], 1),
    ]  # fmt: skip
    metric = PatientLevelMetric("accuracy")
    metric.update(rows)
    assert metric.compute() == pytest.approx(0.5)
    auc = PatientLevelMetric("auc")
    auc.update([(p, torch.tensor(v).tolist(), y) for p, v, y in rows])
    assert 0.0 <= auc.compute() <= 1.0
    with pytest.raises(ValueError, match="kind"):
        PatientLevelMetric("f1")


def test_search_space_file_adds_replaces_and_drops_keys(tmp_path):
    from scripts.tune import load_search_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SEARCH_SPACE_FILE)
    base = {"learning_rate": {"type": "float", "low": "1e-5", "high": 1e-2, "log": True},
            "hidden_size": {"choices": [256, 512]}, "synergic_lambda": {"low": 0, "high": 10}}  # fmt: skip
    space = load_search_space(base, str(space_file))
    assert set(space) == {"hidden_size", "synergic_lambda", "gaussian_kernel", "rotate_degrees"}
    assert space["hidden_size"]["choices"] == [8, 16] and space["gaussian_kernel"]["choices"] == [None, 3]
    with pytest.raises(ValueError, match="lacks"):
        load_search_space({"synergic_lambda": {"type": "float", "low": 0}})
    with pytest.raises(ValueError, match="type in"):
        load_search_space({"fusion": {"type": "choice", "choices": ["concat"]}})


def test_a_study_scored_otherwise_is_not_continued(tmp_path):
    from scripts.tune import open_study

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(storage, "s", "maximize", "val_patient_acc", 3, None, None)
    assert open_study(storage, "s", "maximize", "val_patient_acc", 3, None, None).user_attrs["inner_folds"] == 3
    with pytest.raises(ValueError, match="objective='val_patient_acc'"):
        open_study(storage, "s", "maximize", "val_patient_auc", 3, None, None)
    with pytest.raises(ValueError, match="inner_folds=3"):
        open_study(storage, "s", "maximize", "val_patient_acc", 5, None, None)


def test_tune_prunes_writes_best_yaml_and_continues(data_args, tmp_path):
    out = tmp_path / "study"
    command = [*data_args, *TINY, "--n_trials", "3", "--output_dir", str(out)]
    bundle_run("tune", CONFIGS, *command, "--pruner", PRUNE_TRIAL_1)

    trials = load_trials(out)
    states = {t.number: t.state for t in trials}
    assert sorted(states) == [0, 1, 2]
    assert states[1] == optuna.trial.TrialState.PRUNED
    assert states[0] == states[2] == optuna.trial.TrialState.COMPLETE
    pruned = json.loads((out / "trials" / "1" / "run.json").read_text())
    assert pruned["state"] == "PRUNED" and pruned["pruned_at_step"] == 1
    assert not (out / "trials" / "1" / "fold_1").exists(), "a pruned trial stops at its first epoch end"
    for n in (0, 2):
        trial = json.loads((out / "trials" / str(n) / "run.json").read_text())
        assert trial["state"] == "COMPLETE" and set(trial["params"]) == SEARCHED
        assert trial["value"] == pytest.approx(sum(trial["fold_values"]) / 2)
        fold = json.loads((out / "trials" / str(n) / "fold_1" / "run.json").read_text())["overrides"]
        assert fold["inner_fold"] == 1 and fold["hidden_size"] == trial["params"]["hidden_size"]
        assert not list((out / "trials" / str(n) / "fold_1" / "models").glob("*.pt")), "trial weights are deleted"

    best = yaml.safe_load((out / "best.yaml").read_text())
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]  # a pruned trial has a value too
    best_trial = max(complete, key=lambda t: t.value)  # the first of equals, as Optuna's best_trial
    assert best == best_trial.params and set(best) == SEARCHED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"COMPLETE": 2, "PRUNED": 1} and summary["best"]["trial"] == best_trial.number
    assert "optimization_history.png" in summary["plots"] and "synergic_lambda_slice.png" in summary["plots"]
    assert all((out / p).stat().st_size > 1000 for p in summary["plots"])
    assert "| trial | val_patient_acc |" in (out / "summary.md").read_text()

    # best.yaml is an override file for `run training`, given as the last config file
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundle" / "configs" / "train.yaml"), str(out / "best.yaml")])
    assert parser["hidden_size"] == best["hidden_size"] and parser["rotate_degrees"] == best["rotate_degrees"]
    trained = tmp_path / "trained"
    tiny_without_searched = [a for a in TINY if a not in ("--inner_folds", "2")]
    bundle_run("training", f"['bundle/configs/train.yaml','{out / 'best.yaml'}']", data_args[0], data_args[1],
               *tiny_without_searched, "--bundle_root", str(trained))  # fmt: skip
    assert (trained / "models" / "model.pt").is_file()

    # The same command again continues the study; --final true tests the best settings once.
    log = bundle_run("tune", CONFIGS, *command, "--final", "true")
    assert "3 trial(s) so far" in log
    trials = load_trials(out)
    assert sorted(t.number for t in trials) == list(range(6))
    summary = json.loads((out / "summary.json").read_text())
    final = out / f"final_trial_{summary['best']['trial']}"
    assert summary["final"]["run"] == final.name
    assert json.loads((final / "eval" / "metrics.json").read_text())["split"] == "test"
    assert json.loads((final / "run.json").read_text())["config_file"][-1] == str(final / "best.yaml")

    # `run report` lists the study's plots and its final run, not its twelve trial runs
    from scripts.experiment_report import write_report

    text = write_report(tmp_path, tmp_path / "report").read_text()
    assert "figures/study_optimization_history.png" in text and "figures/study_param_importances.png" in text
    assert (tmp_path / "report" / "figures" / "study_synergic_lambda_slice.png").is_file()
    assert f"### `study/{final.name}`" in text and "trials/0" not in text


def test_two_processes_share_one_sqlite_study(data_args, tmp_path):
    """Started together on a new SQLite file: both finish, every trial has its own number and folder."""
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "monai.bundle", "run", "tune", "--config_file", CONFIGS, *data_args, *TINY,
               "--n_trials", "2", "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=900)[0] for p in processes]
    for p, log in zip(processes, logs, strict=True):
        assert p.returncode == 0, log[-6000:]
    trials = load_trials(out)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == [0, 1, 2, 3]
    ran = [{int(line.split("Trial ")[1].split()[0]) for line in log.splitlines() if "] Trial " in line} for log in logs]
    assert len(ran[0]) == len(ran[1]) == 2 and not ran[0] & ran[1], "each process ran its own two trials"
