"""MONAI's bundle checks and TorchScript export, run exactly as the model zoo's CI and users run them.

The commands run from the repository root in subprocesses. The exported archive is then loaded in a
*separate* process that cannot import ``scripts`` (an import hook refuses it and the working directory is
elsewhere), as a MONAI Deploy or Triton host would load it, and its probabilities are compared with the
eager network's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, WITHOUT_SCRIPTS, monai_bundle
from scripts.network import SDLNet

META = "bundle/configs/metadata.json"
INFERENCE = "bundle/configs/inference.yaml"


def test_verify_net_in_out_passes_on_the_inference_config():
    log = monai_bundle("verify_net_in_out", "network_def", "--meta_file", META, "--config_file", INFERENCE)
    assert "data shape of network is verified with no error" in log


def test_inference_config_has_the_ids_monai_tools_read():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(REPO_ROOT / INFERENCE)
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root"):
        assert key in parser, f"{INFERENCE} lacks `{key}`"


# A process that must not see the bundle's code: `scripts` is refused by an import hook, and the working
# directory is the archive's folder, so neither the installed package nor `bundle/` can supply it.
_LOAD_WITHOUT_SCRIPTS = WITHOUT_SCRIPTS + textwrap.dedent(
    """
    import torch
    from monai.data import load_net_with_metadata

    net, meta, extra = load_net_with_metadata(sys.argv[1], more_extra_files=("inference.json",))
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(net(x), sys.argv[3])
    json.dump({"meta": meta, "inference": json.loads(extra["inference.json"])}, open(sys.argv[4], "w"))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """The default network (AlexNet SDL, 3 grades) with random weights, exported by `ckpt_export`.

    Built unfolded with torchvision's and Zhang's initialisation: its output layers are not zero (probabilities
    differ from 1/3, so the comparison means something), and inference.yaml's folded network folds the older
    checkpoint layout when it loads it."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = SDLNet(random_init="torchvision").eval()
    ckpt = folder / "model.pt"
    torch.save(net.state_dict(), ckpt)  # the format BestModelSaver writes to models/model.pt
    archive = folder / "model.ts"
    monai_bundle(
        "ckpt_export", "network_def",
        "--filepath", str(archive),
        "--ckpt_file", str(ckpt),
        "--meta_file", META,
        "--config_file", INFERENCE,
    )  # fmt: skip
    return {"net": net, "archive": archive, "folder": folder}


@pytest.mark.parametrize("batch", [1, 5])
def test_exported_torchscript_matches_the_eager_model_in_a_process_without_scripts(exported, batch):
    folder: Path = exported["folder"]
    x = torch.rand(batch, 3, 128, 128, generator=torch.Generator().manual_seed(batch))
    torch.save(x, folder / f"x{batch}.pt")
    script = folder / "load.py"
    script.write_text(_LOAD_WITHOUT_SCRIPTS)
    result = subprocess.run(
        [sys.executable, str(script), str(exported["archive"]), f"x{batch}.pt", f"y{batch}.pt", f"extra{batch}.json"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = torch.load(folder / f"y{batch}.pt")
    with torch.no_grad():
        eager = exported["net"](x)
    assert loaded.shape == (batch, 3)
    assert (eager - 1 / 3).abs().max() > 1e-3, "probabilities of 1/3 everywhere would match any archive"
    torch.testing.assert_close(loaded.sum(dim=1), torch.ones(batch), atol=1e-5, rtol=0)
    assert torch.allclose(loaded, eager, atol=1e-5, rtol=0), (loaded - eager).abs().max()

    extra = json.loads((folder / f"extra{batch}.json").read_text())
    assert extra["meta"]["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "grade IV"
    assert extra["inference"]["network_def"]["_target_"] == "scripts.network.SDLNet.from_settings"


def test_export_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """A wrong checkpoint is a clear failure of the command, never a silently half-loaded archive."""
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "wrong.pt")
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(tmp_path / "wrong.ts"),
        "--ckpt_file", str(tmp_path / "wrong.pt"),
        "--meta_file", META,
        "--config_file", INFERENCE,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Missing key(s) in state_dict" in result.stderr
    assert not (tmp_path / "wrong.ts").exists()
