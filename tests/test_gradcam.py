"""Grad-CAM overlays: layer choice per backbone, real non-constant maps, overlay geometry, `run inference --gradcam`."""

from __future__ import annotations

import csv
import json

import pydicom
import pytest
import torch
import torchvision
from conftest import bundle_run
from PIL import Image
from scripts.gradcam import GradCAMWriter, _target_layers, branch_cams, default_target_layer, overlay_image
from scripts.network import SDLNet
from torch import nn

# Zhang's initialisation of the output layers: a from-scratch default net starts at exactly p = 1/3 (zero output
# layers, scripts/network.py), which would leave nothing here to compare
NET = {"backbone": "resnet18", "hidden_size": 16, "random_init": "torchvision"}
INFERENCE = "bundle/configs/inference.yaml"


def _blobs(n: int = 2, size: int = 64) -> torch.Tensor:
    """A bright disc on a dark head-like ellipse, so the network sees structure rather than noise."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for k in range(n):
        head = ((xs / 0.8) ** 2 + (ys / 0.9) ** 2 < 1).float() * 0.4
        lesion = ((xs - 0.3 + 0.2 * k) ** 2 + (ys + 0.2) ** 2 < 0.05).float() * 0.6
        images.append((head + lesion).expand(3, size, size))
    return torch.stack(images)


@pytest.mark.parametrize(
    "name, expected",
    [("alexnet", "features.11"), ("vgg16", "features.29"), ("vgg19", "features.35"), ("resnet50", "layer4")],
)
def test_default_layer_is_the_last_convolutional_stage(name, expected):
    with torch.device("meta"):  # structure only: no memory, no initialisation time
        model = torchvision.models.get_model(name, weights=None)
    layer = default_target_layer(model)
    assert layer == expected
    if name in ("alexnet", "vgg16", "vgg19"):  # the ReLU right after the last convolution
        features = model.features
        index = int(layer.split(".")[1])
        assert isinstance(features[index], nn.ReLU) and isinstance(features[index - 1], nn.Conv2d)
        assert not any(isinstance(m, nn.Conv2d) for m in list(features)[index:])


def test_default_layer_names_each_branch_of_the_network_and_refuses_unknown_backbones():
    with torch.device("meta"):
        net = SDLNet()  # the default: alexnet branches
        densenet = torchvision.models.densenet121()
    assert _target_layers(net, None) == ["branches.0.backbone.features.11", "branches.1.backbone.features.11"]
    assert _target_layers(net, "backbone.features.9")[1] == "branches.1.backbone.features.9"
    with pytest.raises(ValueError, match="target_layer"):
        default_target_layer(densenet)
    with pytest.raises(ValueError, match="not a module"):
        _target_layers(net, "backbone.nope")


@pytest.mark.parametrize("backbone", ["resnet18", "alexnet"])
def test_maps_of_the_predicted_class_are_non_constant_in_unit_range(backbone):
    torch.manual_seed(0)
    net = SDLNet(backbone=backbone, hidden_size=16, random_init="torchvision").eval()
    x = _blobs()
    logits, _ = net.branches[0](x)
    logits[:, 0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.branches[0].backbone.parameters())
    net.zero_grad(set_to_none=True)

    maps = branch_cams(net, x)  # each branch's own predicted class
    assert maps.shape == (2, 2, 1, 64, 64)
    for cam in maps.flatten(0, 1):
        assert cam.std() > 0, "the map is constant"
        assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    assert all(p.grad is None for p in net.parameters()), "gradients left behind"


def test_slices_asking_for_different_classes_in_one_batch_get_their_own_maps():
    """MONAI's class_score would mix the classes of a batch; the implementation groups slices by class."""
    torch.manual_seed(0)
    net = SDLNet(**NET).eval()
    x, classes = _blobs(), torch.tensor([0, 2])
    maps = branch_cams(net, x, classes)
    assert maps.abs().sum() > 0
    for k in range(2):
        alone = branch_cams(net, x[k : k + 1], classes[k : k + 1])
        assert torch.allclose(alone[0], maps[k], atol=1e-5)


def test_overlay_has_the_slice_size_as_rows_by_columns_and_grey_where_no_evidence():
    image = torch.zeros(3, 8, 6)  # (C, x=columns, y=rows)
    image[:, :4] = 1.0  # left half of the columns bright
    cam = torch.zeros(1, 8, 6)
    cam[0, 6:, 4:] = 1.0  # evidence in the lower right corner
    array = overlay_image(image, cam, size=(16, 12))
    assert array.shape == (12, 16, 3) and array.dtype.name == "uint8"  # rows x columns x RGB
    assert (array[:, :4] == 255).all() and (array[0:5, 9:11] == 0).all()  # grey slice, not transposed
    assert len(set(array[-1, -1].tolist())) > 1, "the heat map is not coloured in"


def test_writer_switches_read_command_line_text():
    assert not GradCAMWriter("unused", enabled="false").enabled  # `--gradcam false` arrives as a string
    assert GradCAMWriter("unused", enabled="true", max_slices="null").max_slices is None
    with pytest.raises(ValueError, match="target_class"):
        GradCAMWriter("unused", target_class="loudest")


@pytest.fixture(scope="module")
def tiny_dicom(tmp_path_factory):
    from scripts.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("gradcam_data")
    return generate_demo_dataset(root, n_patients_per_grade=1, slices_per_series=2, image_size=(72, 64), seed=1)


def test_inference_writes_one_overlay_per_branch_and_lists_them(tiny_dicom, tmp_path):
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(SDLNet(**NET).state_dict(), tmp_path / "models" / "model.pt")  # as BestModelSaver writes it
    out = tmp_path / "out"
    bundle_run(
        "inference", INFERENCE,
        "--input", tiny_dicom["dicom_dir"], "--output_dir", str(out), "--bundle_root", str(tmp_path),
        "--image_size", "64", "--device", "cpu", "--backbone", NET["backbone"], "--hidden_size", "16",
        "--gradcam", "true", "--gradcam_max_slices", "3",
        timeout=300,
    )  # fmt: skip

    slices = json.loads((out / "predictions.json").read_text())["slices"]
    assert len(slices) > 3
    assert [("gradcam" in s) for s in slices] == [True] * 3 + [False] * (len(slices) - 3)
    pngs = sorted((out / "gradcam").glob("*.png"))
    assert len(pngs) == 6
    for record in slices[:3]:
        assert set(record["gradcam"]) == {"branch1", "branch2"}
        header = pydicom.dcmread(record["image"], stop_before_pixels=True)
        for branch, relative in record["gradcam"].items():
            path = out / relative
            assert path.is_file() and path.name.endswith(f"_{branch}.png")
            assert header.SOPInstanceUID in path.name
            with Image.open(path) as png:
                assert png.size == (header.Columns, header.Rows) and png.mode == "RGB"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["gradcam_branch2"] for r in rows[:3]] == [s["gradcam"]["branch2"] for s in slices[:3]]
    assert all(r["gradcam_branch1"] == "" for r in rows[3:])
