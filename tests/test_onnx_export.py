"""ONNX and torch.export artefacts of the classifier face, made by the commands users run from the repository root.

``python -m scripts.export`` writes both from one ``torch.export`` trace with a dynamic batch axis; MONAI's own
``python -m monai.bundle onnx_export`` does the ONNX one when given dynamic axes (it embeds no metadata). A small
network (AlexNet branches at 64 px, hidden 32) keeps the exports quick; its output layers get random weights, as
a from-scratch net's are zero (every probability exactly 1/3, nothing to compare). ONNX Runtime runs in this
process; the ``.pt2`` program is loaded in a separate process that cannot import ``scripts``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, WITHOUT_SCRIPTS, monai_bundle
from scripts.network import SDLNet

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

META = "bundle/configs/metadata.json"
INFERENCE = "bundle/configs/inference.yaml"
SIZE, HIDDEN, SYNERGIC_HIDDEN = 64, 32, 8
# what makes MONAI's onnx_export write a dynamic batch axis and the metadata's input/output names
DYNAMIC_BATCH = (
    "{'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}, "
    "'input_names': ['image'], 'output_names': ['pred']}"
)
# the inference config's network_def with the small network's settings
OVERRIDES = (
    "--image_size", str(SIZE),
    "--hidden_size", str(HIDDEN),
    "--network_def#synergic_hidden", str(SYNERGIC_HIDDEN),
)  # fmt: skip


def scripts_export(*args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m scripts.export ARGS`` from the repository root (as ``monai_bundle`` runs MONAI's commands)."""
    command = [sys.executable, "-m", "scripts.export", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-6000:]}"
    return result


def _images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A small folded network saved as a bare state_dict, the way training writes models/model.pt."""
    folder = tmp_path_factory.mktemp("onnx_export")
    torch.manual_seed(0)
    net = SDLNet(hidden_size=HIDDEN, synergic_hidden=SYNERGIC_HIDDEN, fold_pooling=True, image_size=SIZE).eval()
    with torch.no_grad():  # a from-scratch net's output layers are zero: give them weights that spread the classes
        for branch in net.branches:
            branch.classifier[1].weight.normal_(0.0, 2.0)
            branch.classifier[1].bias.normal_(0.0, 0.5)
    probabilities = net(_images(5))
    assert probabilities.std(dim=1).min() > 0.02, "the probabilities are too uniform for the comparison to mean much"
    ckpt = folder / "model.pt"
    torch.save(net.state_dict(), ckpt)
    return {"net": net, "ckpt": ckpt, "folder": folder}


@pytest.fixture(scope="module")
def exported(trained) -> dict:
    """Both artefacts, written by one ``python -m scripts.export`` command."""
    folder = trained["folder"]
    onnx_path, pt2_path = folder / "model.onnx", folder / "model.pt2"
    result = scripts_export(
        "--onnx", str(onnx_path),
        "--pt2", str(pt2_path),
        "--ckpt_file", str(trained["ckpt"]),
        "--meta_file", META,
        "--config_file", INFERENCE,
        *OVERRIDES,
    )  # fmt: skip
    assert "verified" in result.stderr  # the command read both files back and compared them with eager
    return {"onnx": onnx_path, "pt2": pt2_path}


@pytest.fixture(scope="module")
def monai_onnx(trained) -> dict:
    """The ONNX model written by MONAI's own command, with the dynamic batch axis given as converter_kwargs."""
    path = trained["folder"] / "monai.onnx"
    monai_bundle(
        "onnx_export", "network_def",
        "--filepath", str(path),
        "--ckpt_file", str(trained["ckpt"]),
        "--meta_file", META,
        "--config_file", INFERENCE,
        "--input_shape", f"[1, 3, {SIZE}, {SIZE}]",  # the metadata's 128 px would not fit the 64 px network
        "--converter_kwargs", DYNAMIC_BATCH,
        *OVERRIDES,
    )  # fmt: skip
    return {"onnx": path}


def _session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("maker", ["scripts.export", "monai onnx_export"])
def test_onnx_runtime_matches_the_eager_model_at_any_batch(trained, exported, monai_onnx, maker, batch):
    path = exported["onnx"] if maker == "scripts.export" else monai_onnx["onnx"]
    session = _session(path)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", ["batch", 3, SIZE, SIZE])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("pred", ["batch", 3])]
    x = _images(batch)
    (pred,) = session.run(["pred"], {"image": x.numpy()})
    with torch.no_grad():
        eager = trained["net"](x).numpy()
    assert pred.shape == (batch, 3)
    np.testing.assert_allclose(pred, eager, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pred.sum(axis=1), np.ones(batch), atol=1e-5)


def test_onnx_model_takes_only_the_training_image_size(exported):
    """The folded pooling fits one map size: the export fixes H and W, and ONNX Runtime refuses other sizes."""
    with pytest.raises(Exception, match="[Ii]nvalid|dimension"):
        _session(exported["onnx"]).run(["pred"], {"image": np.zeros((1, 3, 2 * SIZE, 2 * SIZE), np.float32)})


def test_onnx_model_carries_the_bundle_metadata_and_config(exported):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"]), load_external_data=False).metadata_props}
    meta = json.loads(props["metadata.json"])
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "grade IV"
    assert json.loads(props["inference.json"])["network_def"]["_target_"] == "scripts.network.SDLNet.from_settings"
    assert json.loads(props["overrides.json"])["hidden_size"] == HIDDEN


# A process that must not see the bundle's code (as in test_export.py): `scripts` is refused by an import hook
# and the working directory is the program's folder.
_LOAD_PT2_WITHOUT_SCRIPTS = WITHOUT_SCRIPTS + textwrap.dedent(
    """
    import torch

    extra = {"metadata.json": "", "inference.json": ""}
    model = torch.export.load(sys.argv[1], extra_files=extra).module()
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        outputs = [model(x) for x in inputs]
    try:
        model(torch.zeros(1, 3, 2 * inputs[0].shape[-1], 2 * inputs[0].shape[-1]))
    except Exception as error:
        refused = type(error).__name__ + ": " + str(error)
    else:
        refused = ""
    torch.save(outputs, sys.argv[3])
    json.dump({name: json.loads(text) for name, text in extra.items()} | {"refused": refused}, open(sys.argv[4], "w"))
    """
)


def test_pt2_program_matches_the_eager_model_in_a_process_without_scripts(trained, exported):
    folder = trained["folder"]
    inputs = [_images(1), _images(5)]
    torch.save(inputs, folder / "pt2_inputs.pt")
    script = folder / "load_pt2.py"
    script.write_text(_LOAD_PT2_WITHOUT_SCRIPTS)
    result = subprocess.run(
        [sys.executable, str(script), str(exported["pt2"]), "pt2_inputs.pt", "pt2_outputs.pt", "pt2_extra.json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = torch.load(folder / "pt2_outputs.pt")
    for x, loaded in zip(inputs, outputs, strict=True):
        with torch.no_grad():
            eager = trained["net"](x)
        assert loaded.shape == (x.shape[0], 3)
        torch.testing.assert_close(loaded, eager, atol=1e-4, rtol=0)

    extra = json.loads((folder / "pt2_extra.json").read_text())
    assert extra["refused"], "the program ran on an image of another size"
    assert extra["metadata.json"]["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert extra["inference.json"]["network_def"]["_target_"] == "scripts.network.SDLNet.from_settings"


def test_export_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """A wrong checkpoint is a clear failure of the command, never a half-loaded model, and leaves no file."""
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "wrong.pt")
    result = scripts_export(
        "--onnx", str(tmp_path / "wrong.onnx"),
        "--pt2", str(tmp_path / "wrong.pt2"),
        "--ckpt_file", str(tmp_path / "wrong.pt"),
        "--meta_file", META,
        "--config_file", INFERENCE,
        *OVERRIDES,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "export failed: the checkpoint" in result.stderr and "does not fit `network_def`" in result.stderr
    assert "Missing key(s) in state_dict" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.pt"]
