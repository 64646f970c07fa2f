"""Test-time augmentation for slice classification: average the model over an image and its left-right mirror.

:class:`FlipTTAInferer` is a MONAI ``Inferer`` wrapping another inferer (``SimpleInferer`` by default). The
``SDLEvaluator`` wraps its inferer in it when built with ``tta_flip=True`` (config switch ``tta_flip``), so
validation, ``run evaluating`` and ``run inference`` share one implementation.

Why averaging the outputs needs no inverse transform: the model outputs class probabilities, which do not move
when the image is mirrored, so the mean of ``network(x)`` and ``network(flip(x))`` is the TTA prediction as it is.
Because the evaluator runs the inferer on ``branch_probabilities`` (``[B, N, C]``), every branch is averaged
and the ensemble (the mean over branches, a linear function) equals the mean of the two ensemble outputs.

Axis: images are ``(C, x=columns, y=rows)`` (see :mod:`scripts.transforms`), batched ``(B, C, x, y)``. A
left-right mirror of the displayed slice reverses its columns, i.e. spatial axis 0 = x, tensor dim 2; this is
what ``monai.transforms.Flip(spatial_axis=0)`` does to one channel-first image. In a sagittal slice the
columns run anterior-posterior, so the mirror swaps front and back of the head: a plausible appearance for a
lesion, unlike an up-down flip, which would put the brain stem on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = ["FlipTTAInferer", "flip_images"]


def flip_images(images: torch.Tensor, spatial_axis: int = 0) -> torch.Tensor:
    """Mirror a batch ``(B, C, *spatial)`` along ``spatial_axis`` (0 = x = columns: the left-right mirror).

    Batched equivalent of ``monai.transforms.Flip(spatial_axis)`` applied to every channel-first image; written
    with ``torch.flip`` because ``Flip`` treats the first dimension as channels and would flip the wrong axis
    of a batch.
    """
    if not 0 <= spatial_axis < images.ndim - 2:
        raise ValueError(f"spatial_axis {spatial_axis} out of range for a batch of shape {tuple(images.shape)}")
    return torch.flip(images, dims=(spatial_axis + 2,))


class FlipTTAInferer(Inferer):
    """Mean of ``inferer(x, network)`` and ``inferer(flip(x), network)``.

    Args:
        inferer: the inferer that runs the network on each view (default ``SimpleInferer``).
        spatial_axis: spatial axis to mirror; 0 (x, columns) is the left-right mirror of a slice.

    Meant for outputs that do not depend on position (class probabilities); a segmentation output would have
    to be flipped back before averaging.
    """

    def __init__(self, inferer: Inferer | None = None, spatial_axis: int = 0) -> None:
        super().__init__()
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.spatial_axis = int(spatial_axis)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``network`` on ``inputs`` and on their mirror; return the average of the two outputs."""
        plain = self.inferer(inputs, network, *args, **kwargs)
        mirrored = self.inferer(flip_images(inputs, self.spatial_axis), network, *args, **kwargs)
        return (plain + mirrored) / 2
