"""The evidence experiment: every arm on the same fold x seed cells, and honest paired statistics."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats
from scripts.evidence import ARMS, paired_comparison
from test_experiments import TINY, run_configs


def test_paired_comparison_is_the_paired_t_test_when_uncorrected_and_wider_when_corrected():
    a, b = [0.8, 0.7, 0.9, 0.6, 0.75], [0.6, 0.6, 0.7, 0.6, 0.7]
    plain = paired_comparison(a, b, test_train_ratio=0.0)
    assert plain["mean_difference"] == pytest.approx(0.11)
    assert plain["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    differences = [x - y for x, y in zip(a, b, strict=True)]
    assert plain["wilcoxon_p"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    corrected = paired_comparison(a, b, test_train_ratio=1 / 4)  # 5-fold: test/train = 1/4
    sd = stats.tstd(differences)
    se = math.sqrt(1 / 5 + 1 / 4) * sd  # Nadeau and Bengio's variance inflation
    assert corrected["t"] == pytest.approx(0.11 / se)
    assert corrected["p_value"] > plain["p_value"]
    low, high = corrected["ci95"]
    assert low == pytest.approx(0.11 - stats.t.ppf(0.975, 4) * se) and high == pytest.approx(
        0.11 + stats.t.ppf(0.975, 4) * se
    )


def test_undefined_tests_are_none_and_undefined_cells_are_left_out():
    same = paired_comparison([0.5, 0.6], [0.5, 0.6], 0.25)
    assert same["mean_difference"] == 0 and same["p_value"] is None and same["wilcoxon_p"] is None
    constant = paired_comparison([0.6, 0.7], [0.5, 0.6], 0.25)  # every difference 0.1: no variance to test
    assert constant["mean_difference"] == pytest.approx(0.1) and constant["p_value"] is None
    assert constant["wilcoxon_p"] is not None
    one = paired_comparison([0.7, float("nan")], [0.5, 0.4], 0.25)
    assert one["n"] == 1 and one["mean_difference"] == pytest.approx(0.2) and one["p_value"] is None


def test_run_evidence_trains_every_arm_on_the_same_cells_and_compares_them(tmp_path_factory):
    from conftest import tiny_datalist

    datalist = tiny_datalist(tmp_path_factory.mktemp("evidence_data"), n_patients_per_grade=6, seed=4)
    out = tmp_path_factory.mktemp("evidence")
    run_configs("evidence", ["train.yaml", "evidence.yaml"], "--datalist", str(datalist), *TINY,
                "--n_folds", "2", "--seeds", "[0]", "--output_dir", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == list(ARMS)
    patients = {}
    for name, arm in summary["arms"].items():
        assert [(c["fold"], c["seed"]) for c in arm["cells"]] == [(0, 0), (1, 0)]
        assert set(arm["mean"]["patient_level"]) == {"accuracy", "precision", "recall", "specificity", "f1", "auc"}
        run = json.loads((out / name / "seed_0_fold_0" / "run.json").read_text())
        patients[name] = (out / name / "seed_0_fold_0" / "eval" / "patients.csv").read_text().splitlines()[1:]
        if name == "sdl_paper_protocol":
            assert run["overrides"]["split_protocol"] == "slice" and run["overrides"]["validate#split"] == "test"
        else:
            assert run["overrides"]["split_protocol"] == "kfold" and run["overrides"]["fold"] == 0
    tested = {name: sorted(row.split(",")[0] for row in rows) for name, rows in patients.items()}
    assert tested["sdl"] == tested["single"] == tested["ensemble"] == tested["sdl3"]  # the same test patients
    assert (
        json.loads((out / "ensemble" / "seed_0_fold_0" / "run.json").read_text())["overrides"]["synergic_lambda"] == 0
    )
    pairs = {(p["a"], p["b"], p["level"], p["metric"]) for p in summary["paired"]}
    assert ("sdl", "ensemble", "patient_level", "accuracy") in pairs and len(pairs) == 10 * 2 * 3
    entry = next(p for p in summary["paired"] if (p["a"], p["b"], p["metric"]) == ("sdl", "ensemble", "accuracy"))
    assert entry["n"] == 2 and "p_value" in entry and "wilcoxon_p" in entry
    assert summary["ceiling"]["ceiling_accuracy_patient"] > 0.5  # read from the demo tree's demo_info.json
    assert (out / "evidence.png").stat().st_size > 0 and "paired differences" in (out / "summary.md").read_text()
    run_configs("report", ["train.yaml", "report.yaml"], "--runs_dir", str(out), "--output_dir", str(out / "report"))
    report = (out / "report" / "report.md").read_text()
    assert "(evidence)" in report and (out / "report" / "figures" / f"{out.name}_evidence.png").is_file()


def test_unknown_arm_is_a_clear_error(tmp_path):
    from scripts.evidence import run_evidence

    with pytest.raises(ValueError, match=r"unknown arms \['sdl4'\]"):
        run_evidence(arms=["sdl", "sdl4"], config_file="bundle/configs/train.yaml", output_dir=tmp_path)
