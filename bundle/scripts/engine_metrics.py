"""The Ignite metrics the engines compute each epoch, for any number of branches, from one factory.

:func:`engine_metrics` builds the training metrics (from :class:`scripts.trainer.SDLTrainer`'s output, decollated by
MONAI into per-sample dicts: per-branch accuracy and cross-entropy, the synergic heads' accuracy and BCE, the
epoch's mean loss) and the validation metrics (from :class:`scripts.evaluator.SDLEvaluator`'s per-slice outputs:
per-branch accuracy, the ensemble's cross-entropy, optionally patient-level accuracy and AUC). The key metrics
(``train_acc``, ``val_acc``) stay in the configs, where MONAI's engines take them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine
from ignite.metrics import Accuracy, Average, Loss, Metric
from monai.handlers import from_engine

from scripts.flags import as_flag
from scripts.metrics import nll_of_probabilities
from scripts.trainer import branch_letters

__all__ = ["BranchOutput", "PatientLevelMetric", "engine_metrics", "scalar_outputs"]


def scalar_outputs(output: Mapping | list) -> dict[str, float]:
    """The per-step scalars of the trainer's output (``loss``, ``ce_a``, ``synergic_bce``, ...), for
    `TensorBoardStatsHandler`'s per-iteration curves. MONAI decollates the output into one dict per sample and
    repeats the batch's scalars in each, so the first sample holds them all."""
    first = output[0] if isinstance(output, list) else output
    return {key: float(value) for key, value in first.items() if key == "loss" or key.startswith(("ce_", "synergic_"))}


class BranchOutput:
    """``(probabilities, labels)`` of one branch, for per-branch metrics of either engine.

    `scripts.trainer.SDLTrainer` gives each branch's own images' probabilities as ``pred_<letter>`` with
    ``label_<letter>`` (decollation pads them with None past the branch's ``B`` samples, because ``pred`` holds all
    ``N*B``); `scripts.evaluator.SDLEvaluator` gives every branch's probabilities for the same slices in
    ``branch_preds`` (``[N, C]`` per decollated sample, ``[B, N, C]`` for a whole batch) beside ``label``.
    """

    def __init__(self, branch: int) -> None:
        self.branch = branch
        self.pred_key, self.label_key = (f"{key}_{branch_letters(branch + 1)[-1]}" for key in ("pred", "label"))

    def __call__(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(output, Mapping):
            if self.pred_key in output:
                return output[self.pred_key], output[self.label_key]
            return output["branch_preds"][:, self.branch], output["label"]
        if self.pred_key in output[0]:
            kept = [o for o in output if o.get(self.pred_key) is not None]
            preds = [o[self.pred_key] for o in kept]
            labels = [o[self.label_key] for o in kept]
        else:
            preds = [o["branch_preds"][self.branch] for o in output]
            labels = [o["label"] for o in output]
        return torch.stack(preds), torch.stack([torch.as_tensor(label) for label in labels])


class PatientLevelMetric(Metric):
    """Accuracy or macro one-vs-rest AUC over *patients*, each graded by the mean of its slices' probabilities.

    A grade belongs to a patient, and the test reports (``patients.csv``, ``metrics.json``) grade patients by
    that mean (`scripts.reports`); selecting settings on slice accuracy would favour patients with many
    slices. Ignite hands a metric only the evaluator's output, which carries no patient id, so this metric
    reads the ids from the batch beside it. Not synchronised across processes: with a `DistributedSampler`
    each rank would score its own share of the patients.
    """

    def __init__(self, kind: str = "accuracy") -> None:
        if kind not in ("accuracy", "auc"):
            raise ValueError(f"kind must be 'accuracy' or 'auc', got {kind!r}")
        self.kind = kind
        super().__init__()

    def reset(self) -> None:
        self._rows: list[dict] = []

    def update(self, output: Sequence[tuple[str, list[float], int]]) -> None:
        for patient_id, probabilities, label in output:
            row = {"patient_id": patient_id, "probabilities": probabilities, "label": label}
            self._rows.append(row)

    def iteration_completed(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, Mapping):  # an evaluator run with decollate=False
            from monai.data import decollate_batch

            outputs, batch = decollate_batch(outputs), decollate_batch(batch)
        rows = []
        for out, item in zip(outputs, batch, strict=True):
            probabilities = torch.as_tensor(out["pred"]).detach().float().cpu().reshape(-1).tolist()
            rows.append((str(item["patient_id"]), probabilities, int(torch.as_tensor(out["label"]).reshape(-1)[0])))
        self.update(rows)

    def compute(self) -> float:
        from scripts.metrics import classification_metrics
        from scripts.reports import average_by

        if not self._rows:
            raise RuntimeError("PatientLevelMetric needs at least one validation slice")
        names = [str(c) for c in range(len(self._rows[0]["probabilities"]))]
        patients = average_by(self._rows, "patient_id", names)
        metrics = classification_metrics([p["probabilities"] for p in patients], [p["label"] for p in patients], names)
        value = metrics["accuracy"] if self.kind == "accuracy" else metrics["macro"]["auc"]
        return float("nan") if value is None else float(value)


def engine_metrics(stage: str, num_branches: int, patient_level: bool = False) -> dict[str, Metric]:
    """The metrics of the ``"train"`` or ``"validation"`` engine, besides its key metric.

    Training (the trainer's output is one batched dict): ``train_acc_branch<i>`` and ``train_ce_branch<i>`` per
    branch, ``train_loss_epoch``, and with two branches or more ``train_synergic_acc`` and ``train_synergic_bce``
    (means over the heads). Validation: ``val_acc_branch<i>`` per branch and ``val_loss``, the negative log of the
    probability the ensemble gives the true grade averaged over slices (the validation loss curve of the paper's
    figures, comparable with the training CE); with ``patient_level`` (set by tune.yaml, the objective of
    `run tune`) also ``val_patient_acc`` and ``val_patient_auc`` (:class:`PatientLevelMetric`).
    """
    if stage == "train":
        metrics: dict[str, Metric] = {}
        for b, letter in enumerate(branch_letters(num_branches)):
            metrics[f"train_acc_branch{b + 1}"] = Accuracy(output_transform=BranchOutput(b))
            metrics[f"train_ce_branch{b + 1}"] = Average(output_transform=from_engine([f"ce_{letter}"], first=True))
        metrics["train_loss_epoch"] = Average(output_transform=from_engine(["loss"], first=True))
        if num_branches > 1:
            for name in ("synergic_acc", "synergic_bce"):
                metrics[f"train_{name}"] = Average(output_transform=from_engine([name], first=True))
        return metrics
    if stage != "validation":
        raise ValueError(f"stage must be 'train' or 'validation', got {stage!r}")
    metrics = {"val_loss": Loss(nll_of_probabilities, output_transform=from_engine(["pred", "label"]))}
    for b in range(num_branches):
        metrics[f"val_acc_branch{b + 1}"] = Accuracy(output_transform=BranchOutput(b))
    if as_flag(patient_level):
        metrics["val_patient_acc"] = PatientLevelMetric("accuracy")
        metrics["val_patient_auc"] = PatientLevelMetric("auc")
    return metrics
