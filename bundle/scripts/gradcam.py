"""Grad-CAM heat maps for every SDL branch, written as PNG overlays beside the inference predictions.

``run inference ... --gradcam true`` attaches :class:`GradCAMWriter` to the inference ``SDLEvaluator``. For each
graded slice (the first ``--gradcam_max_slices`` of them, or all) and each branch it computes MONAI's
:class:`monai.visualize.GradCAM` and saves ``<output_dir>/gradcam/<index>_<SOPInstanceUID>_branch<k>.png``: the
slice in grey with the heat map blended in by :func:`monai.visualize.blend_images` (jet colours, opacity growing
with the map, so regions without evidence stay plain grey). The overlay paths go into the slice's output so
:class:`scripts.reports.PredictionWriter` lists them in ``predictions.json`` / ``predictions.csv``.

Choices, and why:

* **Which class.** By default every branch's map explains the *ensemble's* predicted grade, the grade written
  beside the overlays, so the branches' maps answer the same question ("where did this branch see evidence
  for the reported grade?") and can be compared. ``target_class="branch"`` explains each branch's own
  argmax instead, useful when the branches disagree. The score differentiated is the branch's logit for that
  class (pre-softmax, as in Selvaraju et al.). With ``tta_flip`` the grade is the TTA mean; the map is of the
  unmirrored slice.
* **Which layer** (:func:`default_target_layer`): the last convolutional stage of the branch's backbone, the
  highest-level features that still have a spatial layout. AlexNet / VGG / EfficientNet: the last module of
  ``backbone.features`` that is not pooling (AlexNet ``features.11``, the ReLU after the 5th conv; VGG16
  ``features.29``; EfficientNet ``features.8``); ResNet: ``layer4``; GoogLeNet: ``inception5b``. Any other
  backbone is a clear error; ``target_layer`` (a name inside the branch, e.g. ``backbone.layer3``) overrides.
* **Gradients.** The evaluator runs under ``no_grad``; this handler runs after the forward pass
  (``MODEL_COMPLETED``, after decollation and before ``PredictionWriter`` collects the slice at
  ``ITERATION_COMPLETED``) and recomputes the selected slices under ``torch.enable_grad()``. Only parameter
  gradients are produced, and they are zeroed again afterwards.
* **Size and orientation.** Maps are normalised per slice by their maximum (0 = no evidence, 1 = strongest)
  and resized, with the network input, back to the slice's own size (``spatial_shape`` from the DICOM
  loader), then written as rows x columns, i.e. as the slice is displayed (images are ``(C, x=columns,
  y=rows)`` internally).

MONAI's ``ModelWithHooks`` registers its hooks on the target layers permanently and sets an in-place ReLU
there to out-of-place; both are harmless for inference, where the handler is used.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.transforms import Resize
from monai.utils import convert_to_tensor
from monai.visualize import GradCAM, blend_images
from torch import nn

from scripts.flags import as_flag

__all__ = ["GradCAMWriter", "branch_cams", "default_target_layer", "overlay_image", "save_overlay"]

logger = logging.getLogger(__name__)

TARGET_CLASSES = ("ensemble", "branch")
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def default_target_layer(backbone: nn.Module) -> str:
    """Name, inside a branch's backbone, of the layer Grad-CAM reads: its last convolutional stage.

    Chosen by the torchvision class so it does not depend on the ``backbone`` string the network was built from.
    Raises ``ValueError`` for other architectures: pass ``target_layer`` to :class:`GradCAMWriter` instead.
    """
    models = torchvision.models
    if isinstance(backbone, (models.AlexNet, models.VGG, models.EfficientNet)):
        features = backbone.features
        for index in range(len(features) - 1, -1, -1):
            if not isinstance(features[index], _POOLING):
                return f"features.{index}"
    if isinstance(backbone, models.ResNet):
        return "layer4"
    if isinstance(backbone, models.GoogLeNet):
        return "inception5b"
    raise ValueError(
        f"no default Grad-CAM layer for a {type(backbone).__name__} backbone (known: AlexNet, VGG, EfficientNet, "
        "ResNet, GoogLeNet); pass target_layer, the name of a convolutional layer inside the branch such as "
        "'backbone.layer4'"
    )


class _BranchLogits(nn.Module):
    """Branch ``index``'s logits as ``forward`` (an ``SDLBranch`` returns ``(logits, features)``; GradCAM needs
    logits). Holds the network's ``branches`` under the same attribute, so layer names read as in ``SDLNet``:
    ``branches.0.backbone.features.11``."""

    def __init__(self, net: nn.Module, index: int) -> None:
        super().__init__()
        self.branches = net.branches
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches[self.index](x)[0]


def _normalise(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``[B, 1, ...]`` by its own maximum: 0 stays "no evidence", the peak becomes 1.

    (MONAI's default post-processing maps max to 0 and min to 1, which would invert the overlay.)
    """
    peak = cams.flatten(1).amax(dim=1).clamp_min(torch.finfo(cams.dtype).tiny)
    return cams / peak.view(-1, *[1] * (cams.ndim - 1))


def _target_layers(net: nn.Module, target_layer: str | None) -> list[str]:
    names = []
    for index, branch in enumerate(net.branches):
        inner = target_layer if target_layer else f"backbone.{default_target_layer(branch.backbone)}"
        name = f"branches.{index}.{inner}"
        if name not in dict(net.named_modules()):
            raise ValueError(f"Grad-CAM target layer {name!r} is not a module of the network")
        names.append(name)
    return names


def _grad_cams(net: nn.Module, target_layer: str | None) -> list[GradCAM]:
    """One MONAI ``GradCAM`` per branch, on that branch's logits and its target layer."""
    return [
        GradCAM(_BranchLogits(net, index), target_layers=name, postprocessing=_normalise)
        for index, name in enumerate(_target_layers(net, target_layer))
    ]


def _compute(cams: list[GradCAM], images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[B, N, 1, *spatial]`` maps; ``classes`` ``[B, N]`` is the class each branch's map explains.

    Slices are grouped by class because MONAI's ``class_score`` indexes the logits with ``class_idx`` as given:
    an integer selects one class for the group, whereas a per-slice tensor would sum every slice's score over
    every requested class.
    """
    x = convert_to_tensor(images, track_meta=False).detach().float()
    out = torch.zeros((x.shape[0], len(cams), 1, *x.shape[2:]), dtype=torch.float32, device=x.device)
    with torch.enable_grad():
        for b, cam in enumerate(cams):
            for cls in torch.unique(classes[:, b]).tolist():
                rows = (classes[:, b] == cls).nonzero(as_tuple=True)[0]
                out[rows, b] = cam(x[rows], class_idx=int(cls)).detach().float()
            cam.nn_module.model.zero_grad(set_to_none=True)
    return out


def branch_cams(
    net: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    target_layer: str | None = None,
) -> torch.Tensor:
    """Grad-CAM of every branch of an ``SDLNet`` for ``images`` ``[B, C, *spatial]``: ``[B, N, 1, *spatial]``.

    ``classes``: ``[B]`` (one class for all branches, e.g. the ensemble's grade) or ``[B, N]``; ``None`` uses
    each branch's own argmax. Maps are in [0, 1] at the input's size. Registers hooks on ``net`` (see the module
    docstring); :class:`GradCAMWriter` builds them once and reuses them.
    """
    cams = _grad_cams(net, target_layer)
    return _compute(cams, images, _classes_per_branch(net, images, classes))


def _classes_per_branch(net: nn.Module, images: torch.Tensor, classes: Any) -> torch.Tensor:
    n = len(net.branches)
    if classes is None:
        with torch.no_grad():
            probs = net.branch_probabilities(convert_to_tensor(images, track_meta=False))
        return probs.argmax(dim=2)
    classes = torch.as_tensor(classes, dtype=torch.long)
    return classes.view(-1, 1).expand(-1, n) if classes.ndim == 1 else classes


def overlay_image(
    image: torch.Tensor, cam: torch.Tensor, size: Sequence[int] | None = None, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """RGB ``uint8`` array ``(rows, columns, 3)``: the slice in grey with the heat map blended in.

    ``image`` ``[C, x, y]`` (channel 0 is shown; ImageNet-normalised inputs are rescaled to grey by
    ``blend_images``), ``cam`` ``[1, x, y]`` in [0, 1]; ``size`` ``(x, y)`` resizes both, e.g. to the slice's size.
    The heat map's opacity is ``alpha * cam``, so areas without evidence show the plain slice.
    """
    grey = convert_to_tensor(image, track_meta=False)[:1].detach().float().cpu()
    heat = convert_to_tensor(cam, track_meta=False).detach().float().cpu()
    if size is not None and tuple(int(s) for s in size) != tuple(grey.shape[1:]):
        resize = Resize(spatial_size=tuple(int(s) for s in size), mode="bilinear")
        grey = convert_to_tensor(resize(grey), track_meta=False)
        heat = convert_to_tensor(resize(heat), track_meta=False).clamp(0, 1)
    low, high = grey.min(), grey.max()  # the grey slice spans black to white; the heat keeps its [0, 1] scale
    grey = (grey - low) / (high - low) if high > low else torch.zeros_like(grey)
    rgb = blend_images(grey, heat, alpha=alpha * heat, cmap=cmap, rescale_arrays=False, transparent_background=False)
    array = (np.clip(np.asarray(rgb), 0.0, 1.0) * 255).round().astype(np.uint8)  # [3, x, y]
    return np.ascontiguousarray(array.transpose(2, 1, 0))  # (y=rows, x=columns, RGB)


def save_overlay(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB ``uint8`` array as PNG (Pillow, a matplotlib dependency); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="RGB").save(path)
    return path


def _slice_name(index: int, item: dict) -> str:
    """``<index>_<SOPInstanceUID or file stem>``: unique in the run (index) and traceable to the slice."""
    ident = item.get("sop_instance_uid") or Path(str(item.get("image_path") or item.get("image") or "")).stem
    ident = re.sub(r"[^A-Za-z0-9._-]+", "_", str(ident)).strip("._") if ident else ""
    return f"{index:04d}_{ident}" if ident else f"{index:04d}"


class GradCAMWriter:
    """Ignite handler: Grad-CAM overlays for every branch of the graded slices of an ``SDLEvaluator`` run.

    Args:
        output_dir: folder for the PNGs (created), e.g. ``<inference output_dir>/gradcam``.
        enabled: False attaches nothing (the config switch ``gradcam``).
        max_slices: overlays for the first ``max_slices`` slices of the run only; ``None`` or 0: every slice.
        target_class: ``"ensemble"`` (default: the grade reported for the slice) or ``"branch"`` (each branch's
            own prediction); see the module docstring.
        target_layer: layer name inside each branch, e.g. ``"backbone.layer3"``; default
            :func:`default_target_layer`.
        alpha: maximum opacity of the heat map.
        original_size: resize overlays to the slice's own size (else the network's input size).

    Each processed slice's output gets ``gradcam`` (paths, one per branch) and ``gradcam_class`` (the class
    index each branch's map explains).
    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        max_slices: int | None = None,
        target_class: str = "ensemble",
        target_layer: str | None = None,
        alpha: float = 0.5,
        original_size: bool = True,
    ) -> None:
        if target_class not in TARGET_CLASSES:
            raise ValueError(f"target_class must be one of {TARGET_CLASSES}, got {target_class!r}")
        self.output_dir = Path(output_dir)
        self.enabled = as_flag(enabled)  # command-line `--gradcam false` is the string "false"
        if isinstance(max_slices, str) and max_slices.strip().lower() in ("", "none", "null"):
            max_slices = None
        self.max_slices = int(max_slices) if max_slices else None
        self.target_class = target_class
        self.target_layer = target_layer
        self.alpha = float(alpha)
        self.original_size = original_size
        self._cams: list[GradCAM] | None = None
        self._net: nn.Module | None = None
        self.count = 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        # after MONAI's decollation (registered when the evaluator was built), before ITERATION_COMPLETED
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.count = 0

    def _cams_for(self, net: nn.Module) -> list[GradCAM]:
        if self._cams is None or self._net is not net:  # hooks are permanent: build them once per network
            self._cams, self._net = _grad_cams(net, self.target_layer), net
        return self._cams

    def __call__(self, engine: Engine) -> None:
        from scripts.trainer import sdl_net

        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, dict):
            # decollate=False: the overlays are still written, but the paths only reach PredictionWriter's
            # tables through per-slice outputs, i.e. with MONAI's default decollation
            from monai.data import decollate_batch

            outputs, batch = decollate_batch(outputs), decollate_batch(batch)
        per_slice, items = outputs, batch
        remaining = len(per_slice) if self.max_slices is None else max(0, self.max_slices - self.count)
        chosen = list(range(min(remaining, len(per_slice))))
        if not chosen:
            return
        net = sdl_net(engine.network)
        images = torch.stack([convert_to_tensor(per_slice[i]["image"], track_meta=False) for i in chosen])
        if self.target_class == "ensemble":
            classes = torch.stack([torch.as_tensor(per_slice[i]["pred"]).argmax() for i in chosen])
            classes = classes.view(-1, 1).expand(-1, len(net.branches))
        else:
            classes = torch.stack([torch.as_tensor(per_slice[i]["branch_preds"]).argmax(dim=-1) for i in chosen])
        maps = _compute(self._cams_for(net), images, classes.to(images.device))
        for row, i in enumerate(chosen):
            size = getattr(per_slice[i]["image"], "meta", {}).get("spatial_shape") if self.original_size else None
            size = None if size is None or len(size) != images.ndim - 2 else [int(s) for s in size]
            name = _slice_name(self.count + row, items[i] if i < len(items) else {})
            paths = []
            for b in range(maps.shape[1]):
                array = overlay_image(images[row], maps[row, b], size=size, alpha=self.alpha)
                paths.append(str(save_overlay(array, self.output_dir / f"{name}_branch{b + 1}.png")))
            per_slice[i]["gradcam"] = paths
            per_slice[i]["gradcam_class"] = classes[row].tolist()
        self.count += len(chosen)
