import numpy as np
import pytest
from scripts.metrics import classification_metrics, confusion_matrix

CLASSES = ["II", "III", "IV"]


def test_confusion_matrix_counts_true_rows_predicted_columns():
    matrix = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    m = classification_metrics(probs, labels, CLASSES)
    assert m["accuracy"] == pytest.approx(3 / 5)
    ii = m["per_class"]["II"]
    # grade II: tp=1, fp=1 (a IV called II), fn=1, tn=2
    assert ii["precision"] == pytest.approx(0.5)
    assert ii["recall"] == pytest.approx(0.5)
    assert ii["specificity"] == pytest.approx(2 / 3)
    assert ii["f1"] == pytest.approx(0.5)
    iii = m["per_class"]["III"]
    assert iii["precision"] == pytest.approx(0.5) and iii["recall"] == pytest.approx(1.0)
    assert m["macro"]["recall"] == pytest.approx(np.mean([0.5, 1.0, 0.5]))
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_perfect_ranking_gives_auc_one_and_random_about_half():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    perfect = np.eye(3)[labels] + 0.01 * rng.random((150, 3))
    assert all(
        v == pytest.approx(1.0)
        for v in [m["auc"] for m in classification_metrics(perfect, labels, CLASSES)["per_class"].values()]
    )
    noise = rng.random((150, 3))
    assert 0.3 < classification_metrics(noise, labels, CLASSES)["macro"]["auc"] < 0.7


def test_absent_class_gives_null_not_crash():
    m = classification_metrics(np.eye(3)[[0, 0, 1]], np.array([0, 0, 1]), CLASSES)
    assert m["per_class"]["IV"]["recall"] is None
    assert m["per_class"]["IV"]["auc"] is None
    assert m["accuracy"] == 1.0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        classification_metrics(np.zeros((4, 2)), np.zeros(4), CLASSES)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.zeros((4, 3)), np.zeros(3), CLASSES)


def test_class_present_but_never_predicted_counts_as_zero_in_macro_averages():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 0, 0, 2, 2]]
    m = classification_metrics(probs, labels, CLASSES)
    assert m["per_class"]["III"]["precision"] == 0.0
    assert m["per_class"]["III"]["f1"] == 0.0
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)
