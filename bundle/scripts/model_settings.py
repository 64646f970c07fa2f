"""The settings that define a trained model and its input, kept beside ``model.pt`` as ``model_settings.json``.

A bare state_dict (``model.pt``, as model-zoo bundles ship it) does not say how it was trained: a model trained
with ``--image_size 64`` would otherwise be graded at the default 128 px, and one trained with ``--backbone
resnet18`` would fail to load with a dump of state_dict keys. So training writes, each time it saves ``model.pt``,
the resolved values of the config ids that define the network and its preprocessing (:data:`SETTING_KEYS`), and
every consumer reads them back instead of its own defaults:

* ``run evaluating`` (``evaluate.yaml``) and ``run inference`` (``inference.yaml``): each setting id is
  ``$@trained_settings[...]``; a value given on the command line that differs from the file is an error naming
  both (:func:`check_settings`); a ``model.pt`` without the file is graded with the config's defaults, with a
  warning saying so.
* ``ckpt_export`` and ``python -m scripts.export``: they build ``network_def`` of ``inference.yaml``, so the
  network has the trained architecture, and it carries the settings as its ``model_settings`` attribute (JSON
  text), which a TorchScript archive keeps; the Deploy app reads them from there (``deploy_operators``).
* MONAI Label: its bundle tasks run the same configs on the bundle folder.
* ``--resume true`` with other settings than the file's is an error naming each setting that differs.

Before epoch 1, :func:`prepare_training_outputs` also checks that the checkpoint folder is writable and that a
new run does not silently replace a model already there (``--overwrite true`` or ``--resume true`` needed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts.checkpoints import atomic_write_text
from scripts.flags import as_flag
from scripts.grades import DEFAULT_LABEL_MAP

__all__ = [
    "DEFAULTS",
    "INTENSITY_SCALING",
    "SETTINGS_FILE",
    "SETTING_KEYS",
    "SettingsConflict",
    "check_settings",
    "normalised_settings",
    "prepare_training_outputs",
    "read_model_settings",
    "require_model",
    "settings_json",
    "write_model_settings",
]

logger = logging.getLogger(__name__)

SETTINGS_FILE = "model_settings.json"
# The intensity scaling of scripts.transforms.preprocessing_transforms, recorded so a model trained under
# another scaling (an older or a changed chain) is recognised rather than silently graded on other inputs.
INTENSITY_SCALING = "percentiles 0.5-99.5 -> 0..1, clipped"
# The config values train.yaml ships (tests/test_model_settings.py checks they are the same): what a
# model.pt without a settings file is graded with.
DEFAULTS: dict[str, Any] = {
    "backbone": "alexnet",
    "num_branches": 2,
    "hidden_size": 1024,
    "fusion": "concat",
    "fold_pooling": True,
    "label_map": dict(DEFAULT_LABEL_MAP),
    "image_size": 128,
    "gaussian_kernel": None,
    "pretrained": False,
    "include_post_contrast": True,
    "roi": "none",
    "roi_fraction": 0.375,
}
SETTING_KEYS = tuple(DEFAULTS)
_FLAGS = ("fold_pooling", "pretrained", "include_post_contrast")
_INTEGERS = ("num_branches", "hidden_size", "image_size")


class SettingsConflict(ValueError):
    """A value given for a run disagrees with the settings the model was trained with."""


def normalised_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Values as one type each, whether they came from YAML, JSON or the command line (``"64"``, ``"false"``)."""
    out: dict[str, Any] = {}
    for key in SETTING_KEYS:
        value = settings[key]
        if key in _FLAGS:
            value = as_flag(value)
        elif key in _INTEGERS:
            value = int(value)
        elif key == "roi_fraction":
            value = float(value)
        elif key == "gaussian_kernel":
            value = None if value in (None, 0, "0", "none", "None", "null") else int(value)
        elif key == "label_map":
            value = {str(name): int(index) for name, index in dict(value).items()}
        else:
            value = str(value)
        out[key] = value
    return out


def settings_json(settings: Mapping[str, Any]) -> str:
    """The settings as the file holds them: :data:`SETTING_KEYS`, the class names in order and the scaling."""
    values = normalised_settings(settings)
    values["class_names"] = sorted(values["label_map"], key=values["label_map"].get)
    values["intensity_scaling"] = INTENSITY_SCALING
    return json.dumps(values, indent=1)


def _differences(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    recorded, given = normalised_settings(recorded), normalised_settings(given)
    return [
        f"{key}: {given[key]!r} here, {recorded[key]!r} in training"
        for key in SETTING_KEYS
        if recorded[key] != given[key]
    ]


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(path.read_text())
        settings = normalised_settings({**DEFAULTS, **{k: recorded[k] for k in SETTING_KEYS if k in recorded}})
    except (ValueError, TypeError, AttributeError) as error:
        raise SettingsConflict(f"{path} is not a settings file this bundle can read: {error}") from error
    scaling = recorded.get("intensity_scaling", INTENSITY_SCALING)
    if scaling != INTENSITY_SCALING:
        raise SettingsConflict(
            f"{path}: the model was trained on inputs scaled as '{scaling}', this bundle scales them as "
            f"'{INTENSITY_SCALING}'; grade it with the bundle version that trained it."
        )
    logger.info("model settings from %s: %s", path, settings)
    return {**settings, "_source": str(path)}


def require_model(model_file: str | os.PathLike) -> Path:
    """``model_file``, or a ``FileNotFoundError`` saying how to get one (first step of evaluating and inference)."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(
            f"no trained model at {model_file.absolute()}: train one first (run training), or point --bundle_root, "
            "--ckpt_dir or --ckpt_path at the folder or file that holds it"
        )
    return model_file


def read_model_settings(model_file: str | os.PathLike) -> dict[str, Any]:
    """The settings in ``model_settings.json`` beside ``model_file``, or :data:`DEFAULTS` (with a warning) without
    that file.

    The result has ``"_source"``: the file's path, or ``None`` for the defaults, which :func:`check_settings`
    reads to know whether there is anything to check against.
    """
    model_file = Path(model_file)
    path = model_file.with_name(SETTINGS_FILE)
    if not path.is_file():
        logger.warning(
            "%s not found: grading %s with the config's settings (%s); a model trained with other settings needs "
            "them on the command line.",
            path,
            model_file,
            ", ".join(f"{k}={v}" for k, v in DEFAULTS.items() if k != "label_map"),
        )
        return {**DEFAULTS, "_source": None}
    return _read_settings_file(path)


def check_settings(trained: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Raise :class:`SettingsConflict` when a value given for this run differs from the trained one.

    ``given`` holds the config's resolved values; they equal ``trained`` unless the command line overrode them.
    Without a settings file (``trained["_source"]`` is None) the given values are the only ones there are.
    """
    if trained.get("_source") is None:
        return normalised_settings(given)
    differences = _differences(trained, given)
    if differences:
        raise SettingsConflict(
            f"the model was trained with other settings than this run's ({trained['_source']}): "
            + "; ".join(differences)
            + ". Leave these options out to use the trained values."
        )
    return normalised_settings(given)


def write_model_settings(model_file: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write ``model_settings.json`` beside ``model_file`` atomically (temporary name, then rename).

    Training calls it right after it saves ``model.pt`` (``scripts.handlers.BestModelSaver``), so the file always
    describes the model beside it, also when a run into that folder fails before its first validation.
    """
    return atomic_write_text(settings_json(settings), Path(model_file).with_name(SETTINGS_FILE))


def prepare_training_outputs(
    ckpt_dir: str | os.PathLike,
    settings: Mapping[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    model_name: str = "model.pt",
) -> Path:
    """Before epoch 1, check that training can keep what it makes in ``ckpt_dir``, and loses nothing there.

    * ``ckpt_dir`` is made if needed, and must be a writable folder: a file or a read-only folder fails here,
      not after an epoch of training.
    * A folder that already holds a model (``model.pt``) is continued only with ``resume`` and replaced only
      with ``overwrite``; otherwise a ``FileExistsError`` says so, and nothing in the folder changes.
    * With ``resume`` the settings must equal the ones in its ``model_settings.json`` (a resumed run continues
      the same model), else :class:`SettingsConflict` names each setting that differs.
    """
    folder = Path(ckpt_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"ckpt_dir {folder} is a file, not a folder: give --ckpt_dir a folder")
    probe = folder / ".write_test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"cannot write the model's outputs into {folder}: {error.strerror or error}") from None
    model, recorded = folder / model_name, folder / SETTINGS_FILE
    if as_flag(resume):
        if recorded.is_file():
            differences = _differences(_read_settings_file(recorded), settings)
            if differences:
                raise SettingsConflict(
                    f"--resume true continues the model in {folder}, trained with other settings: "
                    + "; ".join(differences)
                    + ". Resume with the same settings, or train anew into another --ckpt_dir."
                )
    elif model.is_file() and not as_flag(overwrite):
        raise FileExistsError(
            f"{model} already holds a trained model: continue it with --resume true, replace it with "
            "--overwrite true, or train into another --bundle_root or --ckpt_dir"
        )
    return folder
