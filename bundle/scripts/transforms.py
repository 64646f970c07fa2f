"""MONAI dictionary transform chains for SDL glioma grading.

One deterministic chain (:func:`preprocessing_transforms`) serves validation, evaluation and inference, so
the model never sees differently prepared images at deploy time; :func:`training_transforms` is that same
chain plus random rotation appended at the end, so ``CacheDataset`` caches everything up to the first
random transform and only the rotation is recomputed each epoch.

Choices:

* Intensity: ``ScaleIntensityRangePercentilesd`` 0.5..99.5 percentile -> 0..1 with clipping. MR intensities
  have no absolute unit and differ between scanners/series; percentiles (rather than min/max as in
  ``ScaleIntensityd``) ignore the few hot pixels and flow artefacts that would otherwise squash the brain
  into a narrow band.
* Rotation: ``prob=1.0`` with an angle uniform in +-``rotate_degrees`` (the paper rotates by +-10 degrees).
  A uniform angle already includes near-identity rotations; ``prob=0.5`` would only add a spike at 0 deg.
  Padding uses ``border``: the rotation runs after ImageNet normalisation, where a literal zero is not
  background, while the replicated border of a head slice is background.
* Gaussian smoothing emulates OpenCV's ``GaussianBlur(img, (k, k), 0)``: ``sigma = 0.3*((k-1)*0.5-1)+0.8``
  and a kernel exactly ``k`` pixels wide, normalised to sum 1, reflect-101 borders. MONAI's
  ``GaussianSmoothd`` has no truncation argument (its kernel is ``2*round(4*sigma)+1`` wide, e.g. 7 for
  k=3), so :class:`OpenCVGaussianSmoothd` builds the kernel with MONAI's ``gaussian_1d`` and applies it with
  ``separable_filtering``.

Axis convention: images are ``(C, x=columns, y=rows)`` as produced by
:class:`scripts.dicom_reader.DicomSliceReader`; with ``load=False`` pass arrays in that same convention.
PNG/JPG files (image-folder datasets; ``reader="auto"`` picks by suffix) are read by MONAI's ``PILReader``
with its default ``reverse_indexing=True``, which also returns ``(x=width, y=height)``, and colour images are
converted to one grey channel (:func:`scripts.image_folder.to_grey`) before the same chain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import ImageReader, PILReader
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandomizableTrait,
    RandRotated,
    RepeatChanneld,
    Resized,
    ScaleIntensityRangePercentilesd,
    ToDeviced,
)
from monai.utils import convert_to_dst_type

from scripts.dicom_reader import DicomSliceReader
from scripts.flags import as_flag
from scripts.roi import roi_transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SUPPORTED_GAUSSIAN_KERNELS",
    "READERS",
    "OpenCVGaussianSmoothd",
    "is_random",
    "opencv_sigma",
    "preprocessing_transforms",
    "split_loadable",
    "training_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED_GAUSSIAN_KERNELS = (3, 5, 7)

logger = logging.getLogger(__name__)


def opencv_sigma(kernel_size: int) -> float:
    """Sigma OpenCV derives from a kernel size when ``sigmaX=0`` (``cv2.getGaussianKernel``)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def _check_kernel(gaussian_kernel: int | None) -> int | None:
    if gaussian_kernel in (None, 0):
        return None
    if isinstance(gaussian_kernel, bool) or gaussian_kernel not in SUPPORTED_GAUSSIAN_KERNELS:
        raise ValueError(
            f"gaussian_kernel must be None/0 (off) or one of {SUPPORTED_GAUSSIAN_KERNELS}, got {gaussian_kernel!r}"
        )
    return int(gaussian_kernel)


class OpenCVGaussianSmoothd(MapTransform):
    """Gaussian smoothing with an OpenCV-style ``k x k`` kernel on channel-first 2D/3D images.

    Kept as a MONAI ``MapTransform`` so it composes, caches and serialises like the built-in transforms.
    """

    def __init__(self, keys: KeysCollection, kernel_size: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        checked = _check_kernel(kernel_size)
        if checked is None:
            raise ValueError("kernel_size must be one of 3, 5, 7; leave the transform out to disable smoothing")
        self.kernel_size = checked
        self.sigma = opencv_sigma(checked)
        tail = (checked - 1) // 2
        # truncated = tail / sigma makes gaussian_1d's tail exactly (k-1)/2 samples on each side.
        self.kernel = gaussian_1d(
            torch.tensor(self.sigma), truncated=(tail + 0.25) / self.sigma, approx="sampled", normalize=True
        )
        if self.kernel.numel() != checked:  # guards the truncation arithmetic above
            raise AssertionError(f"kernel has {self.kernel.numel()} taps, expected {checked}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            img_t = torch.as_tensor(img, dtype=torch.float32)
            spatial_dims = img_t.ndim - 1
            out = separable_filtering(img_t.unsqueeze(0), [self.kernel.to(img_t.device)] * spatial_dims, "reflect")
            d[key], *_ = convert_to_dst_type(out.squeeze(0), dst=img, dtype=torch.float32)
        return d


READERS = ("auto", "dicom", "pil")


def _reader(name: str) -> ImageReader:
    """The file reader of a chain: DICOM slices, PNG/JPG read to one grey channel, or either by file suffix."""
    from scripts.image_folder import GreyImageOrDicomReader, to_grey

    if name == "auto":
        return GreyImageOrDicomReader()
    if name == "dicom":
        return DicomSliceReader()
    if name == "pil":
        return PILReader(converter=to_grey)  # reverse_indexing=True: (x=width, y=height) like DICOM
    raise ValueError(f"unknown reader {name!r}; choose one of {READERS}")


def split_loadable(
    records: Sequence[Mapping[str, Any]], reader: str = "auto", key: str = "image"
) -> tuple[list[dict], list[dict[str, str]]]:
    """The records whose ``key`` file the chain's reader decodes, and a skip row for each one it cannot.

    The indexer checks headers and pixel-data lengths but never decodes, so a corrupt compressed stream, a
    colour image, or a file changed or deleted since indexing would otherwise stop a run at the first batch
    (or while the cache fills). Each file is decoded once here, with the reader the chain uses; a failure is
    logged with the file and the error and becomes a row (``path``, ``reason`` = ``load_failed``, ``detail``)
    for the run's skipped-files CSV, and the run goes on with the others.
    """
    from scripts.skip_reasons import REASON_LOAD_FAILED

    load = LoadImage(reader=_reader(reader), image_only=True)
    kept, failed = [], []
    for record in records:
        path = record[key]
        try:
            load(path)
        except Exception as error:  # noqa: BLE001 - any decoder's failure means this one slice is unusable
            message = str(error).replace(str(path), "").strip(" :") or type(error).__name__
            failed.append({"path": str(path), "reason": REASON_LOAD_FAILED, "detail": message})
            logger.warning("skipped %s: it cannot be loaded (%s)", path, message)
        else:
            kept.append(dict(record))
    if failed:
        logger.warning("%d of %d slices could not be loaded and were skipped", len(failed), len(records))
    return kept, failed


def preprocessing_transforms(
    image_size: int = 128,
    pretrained: bool = False,
    gaussian_kernel: int | None = None,
    keys: Sequence[str] | str = ("image",),
    load: bool = True,
    reader: str = "auto",
    roi_fraction: float | None = None,
) -> Compose:
    """The deterministic chain for validation, evaluation and inference (and the head of the training chain).

    Load (``DicomSliceReader``) -> channel first -> percentile scaling to 0..1 -> resize to
    ``image_size`` x ``image_size`` -> optional OpenCV-style Gaussian blur -> repeat to 3 channels ->
    ImageNet normalisation if ``pretrained`` -> float32 ``MetaTensor`` (a ``torch.Tensor`` subclass; metadata
    such as ``filename_or_obj`` is kept for reporting, and the training chain's ``RandRotated`` would
    re-attach it anyway, so both chains return the same type).

    ``load=False`` skips ``LoadImaged`` so an already loaded 2D array/tensor (``(x=columns, y=rows)``, no
    channel) runs through exactly the same steps, e.g. in a deploy path that decodes DICOM itself.

    ``reader``: ``"auto"`` (default) reads PNG/JPG/BMP/TIFF files of image-folder datasets with MONAI's
    ``PILReader`` (colour converted to grey) and every other file with ``DicomSliceReader``, so one config
    serves both kinds of datalist; ``"dicom"`` or ``"pil"`` force one reader. Everything after loading is the same.

    ``roi_fraction`` (``--roi mask``): each record also has a lesion mask under ``"mask"``, loaded and resized with
    the slice (nearest neighbour), and the resized slice is cropped to a square of that fraction of its side
    around the tumour and resized back (:func:`scripts.roi.roi_transforms`).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    kernel = _check_kernel(gaussian_kernel)
    masks = [] if roi_fraction is None else ["mask"]
    if masks and not load:
        raise ValueError("roi_fraction needs the chain to load each slice's mask (load=True)")
    steps: list = []
    if load:
        steps.append(LoadImaged(keys=[*keys, *masks], reader=_reader(reader), image_only=True))
    steps += [
        EnsureChannelFirstd(keys=[*keys, *masks], channel_dim="no_channel"),
        ScaleIntensityRangePercentilesd(keys=keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys=keys, spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
    ]
    if masks:
        steps.append(Resized(keys=masks, spatial_size=(image_size, image_size), mode="nearest"))
        steps += roi_transforms(image_size, roi_fraction, keys)
    if kernel is not None:
        steps.append(OpenCVGaussianSmoothd(keys=keys, kernel_size=kernel))
    steps.append(RepeatChanneld(keys=keys, repeats=3))
    if as_flag(pretrained):  # `--pretrained false` arrives as the string "false"
        steps.append(NormalizeIntensityd(keys=keys, subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True))
    steps.append(EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32))
    return Compose(steps)


def training_transforms(
    image_size: int = 128,
    pretrained: bool = False,
    gaussian_kernel: int | None = None,
    rotate_degrees: float = 10.0,
    keys: Sequence[str] | str = ("image",),
    rotate_prob: float = 1.0,
    load: bool = True,
    reader: str = "auto",
    device: str | torch.device | None = None,
    roi_fraction: float | None = None,
) -> Compose:
    """:func:`preprocessing_transforms` followed by a random rotation of +-``rotate_degrees`` (see module doc).

    The random transform is last, so ``CacheDataset`` caches the whole deterministic prefix. With ``device``
    (a GPU) that prefix ends by moving the slice there (``ToDeviced``): the cache then lives on the device and
    the rotation runs there, MONAI's recipe for a DataLoader that is never the limit (it then needs no workers).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    chain = preprocessing_transforms(
        image_size=image_size,
        pretrained=pretrained,
        gaussian_kernel=gaussian_kernel,
        keys=keys,
        load=load,
        reader=reader,
        roi_fraction=roi_fraction,
    )
    steps = list(chain.transforms)
    if device is not None:
        steps.append(ToDeviced(keys=keys, device=device))
    if rotate_degrees and rotate_prob > 0:
        steps.append(
            RandRotated(
                keys=keys,
                range_x=math.radians(rotate_degrees),
                prob=rotate_prob,
                keep_size=True,
                mode="bilinear",
                padding_mode="border",
                dtype=torch.float32,
            )
        )
    return Compose(steps)


def is_random(transform: Any) -> bool:
    """True for transforms that draw random numbers (MONAI marks them with ``RandomizableTrait``)."""
    return isinstance(transform, RandomizableTrait)
