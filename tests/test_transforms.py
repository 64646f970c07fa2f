"""Preprocessing/training chains: shapes, types, ranges, smoothing and the random-last rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from scripts.synthetic_dicom import write_mr_slice
from scripts.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OpenCVGaussianSmoothd,
    is_random,
    opencv_sigma,
    preprocessing_transforms,
    training_transforms,
)

UIDS = {"patient_id": "TEST-0001", "study_uid": "1.2.3.4", "series_uid": "1.2.3.4.5"}


def _noisy(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 2000, size=(rows, cols)).astype(np.uint16)
    img[rows // 4 : rows // 2, cols // 4 : cols // 2] = 1900
    return img


@pytest.fixture(params=[(160, 160), (96, 140)], ids=["square", "non-square"])
def dicom_record(tmp_path, request):
    path = write_mr_slice(tmp_path / "x.dcm", _noisy(*request.param), **UIDS)
    return {"image": str(path), "label": 1, "patient_id": "TEST-0001"}


def test_preprocessing_output(dicom_record):
    out = preprocessing_transforms()(dict(dicom_record))
    img = out["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32
    assert tuple(img.shape) == (3, 128, 128)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert out["label"] == 1 and out["patient_id"] == "TEST-0001"  # other keys pass through


def test_imagenet_normalisation(dicom_record):
    plain = preprocessing_transforms()(dict(dicom_record))["image"]
    norm = preprocessing_transforms(pretrained=True)(dict(dicom_record))["image"]
    for c in range(3):
        expected = (plain[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(norm[c], expected, atol=1e-5, rtol=1e-5)
    assert float(norm.min()) < 0.0


def test_load_false_runs_same_chain(dicom_record):
    from scripts.dicom_reader import DicomSliceReader

    reader = DicomSliceReader()
    array, _ = reader.get_data(reader.read(dicom_record["image"]))
    loaded = preprocessing_transforms(load=False)({"image": array})["image"]
    from_file = preprocessing_transforms()(dict(dicom_record))["image"]
    torch.testing.assert_close(torch.as_tensor(loaded), torch.as_tensor(from_file))


def test_gaussian_kernel_smooths_more_with_bigger_kernels():
    image = _noisy(128, 128).astype(np.float32)
    variances = []
    for k in (None, 3, 5, 7):
        out = preprocessing_transforms(load=False, gaussian_kernel=k)({"image": image})["image"]
        variances.append(float(out[0].var()))
    assert variances[0] > variances[1] > variances[2] > variances[3]


def test_opencv_kernel_width_and_sigma():
    for k in (3, 5, 7):
        t = OpenCVGaussianSmoothd(keys="image", kernel_size=k)
        assert t.kernel.numel() == k
        assert t.sigma == pytest.approx(0.3 * ((k - 1) * 0.5 - 1) + 0.8)
        assert float(t.kernel.sum()) == pytest.approx(1.0)
    assert opencv_sigma(3) == pytest.approx(0.8)
    # OpenCV's getGaussianKernel(3, 0) = [0.25, 0.5, 0.25]-like: centre weight about 0.52
    assert float(OpenCVGaussianSmoothd(keys="image", kernel_size=3).kernel[1]) == pytest.approx(0.522, abs=2e-3)


@pytest.mark.parametrize("kernel", [1, 2, 4, 9, -3, True])
def test_invalid_kernel_raises(kernel):
    with pytest.raises(ValueError, match="gaussian_kernel"):
        preprocessing_transforms(gaussian_kernel=kernel)


def test_zero_kernel_means_off():
    image = _noisy(64, 64).astype(np.float32)
    a = preprocessing_transforms(load=False, gaussian_kernel=0)({"image": image})["image"]
    b = preprocessing_transforms(load=False)({"image": image})["image"]
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))


def test_rotation_changes_image_keeps_shape():
    image = _noisy(100, 120).astype(np.float32)
    chain = training_transforms(load=False, rotate_degrees=10.0)
    chain.set_random_state(seed=3)
    rotated = chain({"image": image})["image"]
    plain = preprocessing_transforms(load=False)({"image": image})["image"]
    assert tuple(rotated.shape) == (3, 128, 128) and rotated.dtype == torch.float32
    assert not torch.allclose(torch.as_tensor(rotated), torch.as_tensor(plain))


def test_random_transforms_are_last():
    for kwargs in ({}, {"pretrained": True, "gaussian_kernel": 5}):
        flags = [is_random(t) for t in training_transforms(**kwargs).transforms]
        assert any(flags)
        first_random = flags.index(True)
        assert all(flags[first_random:]), "a deterministic transform follows a random one"
        assert not any(is_random(t) for t in preprocessing_transforms(**kwargs).transforms)


def test_training_chain_with_cache_dataset(tmp_path):
    records = [
        {"image": str(write_mr_slice(tmp_path / f"{i}.dcm", _noisy(80, 90, i), **UIDS)), "label": i % 3}
        for i in range(3)
    ]
    ds = CacheDataset(records, transform=training_transforms(image_size=64), progress=False)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, 64, 64)


def test_a_device_cache_holds_the_deterministic_part_there_and_rotates_as_on_the_host(tmp_path):
    """The CUDA path (train.yaml's ``cache_on_device``), run here with the CPU as the device: the cached part ends
    with ``ToDeviced``, and the epoch's rotations are the host path's."""
    records = [
        {"image": str(write_mr_slice(tmp_path / f"{i}.dcm", _noisy(80, 90, i), **UIDS)), "label": i % 3}
        for i in range(3)
    ]
    on_device = training_transforms(image_size=64, device="cpu")
    names = [type(t).__name__ for t in on_device.transforms]
    assert names[-2:] == ["ToDeviced", "RandRotated"]  # cached: everything up to and including the move
    datasets = [
        CacheDataset(records, transform=chain, progress=False)
        for chain in (on_device, training_transforms(image_size=64))
    ]
    for dataset in datasets:
        dataset.transform.set_random_state(seed=5)
    device_items, host_items = ([dataset[i]["image"] for i in range(3)] for dataset in datasets)
    for a, b in zip(device_items, host_items, strict=True):
        assert a.device.type == "cpu" and torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_train_yaml_keeps_the_cache_on_the_device_without_workers_when_asked(tmp_path):
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.yaml"))
    parser.update({"records": [], "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("cache_on_device") is False  # the default off CUDA
    parser.update({"cache_on_device": True})
    parser.parse(reset=True)
    chain = parser.get_parsed_content("train#preprocessing")
    assert [type(t).__name__ for t in chain.transforms][-2:] == ["ToDeviced", "RandRotated"]
    assert chain.transforms[-2].converter.device == torch.device("cpu")
    resolved = {key: parser.get_parsed_content(f"train#dataloader#{key}") for key in ("num_workers", "pin_memory")}
    assert resolved == {"num_workers": 0, "pin_memory": False}
    parser.update({"cache_on_device": False})
    parser.parse(reset=True)
    assert "ToDeviced" not in [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert parser.get_parsed_content("train#dataloader#num_workers") == parser.get_parsed_content("num_workers")
