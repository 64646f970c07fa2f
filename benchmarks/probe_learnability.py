"""Why a network trained from random weights does not learn the demo: the tumour's look against its context.

Trains a ResNet-18 from random weights (torchvision, 3 classes, Adam 3e-4, batch 8, rotation +-10 degrees) on
square crops of the demo's lesion-bearing sagittal T1 slices, centred on the tumour (from the demo's masks) and
cut after the bundle's own preprocessing to 128 px, and reports validation accuracy on the validation patients'
crops of the same size. Small crops hold the tumour and little else; large ones add the surrounding brain, i.e.
the patient's anatomy and scanner; the whole slice is the task the bundle trains on. If the small crops are
learned quickly and the large ones are memorised (training loss near 0, validation near chance), the obstacle is
not the tumour's appearance but its context, which a few dozen training patients let the network memorise.

    python benchmarks/probe_learnability.py [--crops 48 80 128] [--seeds 0 1 2] [--steps 300]
        [--patients-per-grade 12] [--demo DIR]

The demo tree is generated (or reused) in ``--demo`` (default: the bundle's demo cache). Split: the bundle's
patient-level split for each seed. A diagnostic, not a result of the method: no synergic pairing, one network.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.demo_data import default_cache_dir, ensure_demo_dataset  # noqa: E402
from scripts.records import resolve_datalist  # noqa: E402
from scripts.splits import make_splits  # noqa: E402
from scripts.transforms import preprocessing_transforms  # noqa: E402

SIZE = 128


def tumour_centre(mask_path: Path) -> tuple[float, float] | None:
    """Tumour centroid in the preprocessed slice's (x=column, y=row) pixels, or None without tumour pixels."""
    mask = np.asarray(Image.open(mask_path))
    rows, cols = np.nonzero(mask == 1)
    if len(rows) < 20:
        return None
    return cols.mean() * SIZE / mask.shape[1], rows.mean() * SIZE / mask.shape[0]


def crop(image: torch.Tensor, centre: tuple[float, float], size: int) -> torch.Tensor:
    half = size // 2
    x = int(min(max(round(centre[0]), half), SIZE - half))
    y = int(min(max(round(centre[1]), half), SIZE - half))
    return image[:, x - half : x + half, y - half : y + half]


def rotate(batch: torch.Tensor, generator: torch.Generator, degrees: float = 10.0) -> torch.Tensor:
    angles = (torch.rand(len(batch), generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin, zero = torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, padding_mode="border", align_corners=False)


def train_and_validate(
    images: torch.Tensor, labels: torch.Tensor, train: np.ndarray, val: np.ndarray, seed: int, steps: int
) -> tuple[list[float], float]:
    """Validation accuracy every 50 steps, and the last 50 steps' mean training loss."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)
    rng = np.random.default_rng(seed)
    accuracies, losses = [], []
    for step in range(1, steps + 1):
        batch = torch.from_numpy(rng.choice(train, 8, replace=False))
        loss = F.cross_entropy(net(rotate(images[batch], generator)), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            net.eval()
            with torch.no_grad():
                predicted = torch.cat([net(images[val[i : i + 64]]).argmax(1) for i in range(0, len(val), 64)])
            net.train()
            accuracies.append((predicted == labels[val]).float().mean().item())
    return accuracies, float(np.mean(losses[-50:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, nargs="+", default=[48, 80, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--patients-per-grade", type=int, default=12)
    parser.add_argument("--demo", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    root = args.demo or default_cache_dir()
    paths = ensure_demo_dataset(root, n_patients_per_grade=args.patients_per_grade)
    records = resolve_datalist(dicom_source={"dataset_dir": paths["dicom_dir"], "grades_csv": paths["grades_csv"]},
                               index_output=str(Path(root).with_name(Path(root).name + "_probe_datalist.json")),
                               label_map={"II": 0, "III": 1, "IV": 2})  # fmt: skip
    with open(Path(root) / "masks" / "masks.csv") as f:
        masks = {r["sop_instance_uid"]: Path(root) / r["mask"] for r in csv.DictReader(f)}
    centres = {r["sop_instance_uid"]: tumour_centre(masks[r["sop_instance_uid"]]) for r in records}
    records = [r for r in records if centres[r["sop_instance_uid"]] is not None]  # slices showing tumour
    chain = preprocessing_transforms(SIZE)
    slices = torch.stack([chain({"image": r["image"]})["image"].as_tensor() for r in records])
    labels = torch.tensor([int(r["label"]) for r in records])
    print(f"{len(records)} slices with tumour of {len({r['patient_id'] for r in records})} patients; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip

    for size in args.crops:
        centred = zip(slices, (centres[r["sop_instance_uid"]] for r in records), strict=True)
        images = torch.stack([crop(image, centre, size) for image, centre in centred])
        finals = []
        for seed in args.seeds:
            split = make_splits(records, seed=seed)
            index = {r["sop_instance_uid"]: i for i, r in enumerate(records)}
            train = np.array([index[r["sop_instance_uid"]] for r in split["train"]])
            val = np.array([index[r["sop_instance_uid"]] for r in split["validation"]])
            started = time.perf_counter()
            accuracies, last_loss = train_and_validate(images, labels, train, val, seed, args.steps)
            finals.append(accuracies[-1])
            print(f"crop {size:3d} px, seed {seed}: validation accuracy every 50 steps "
                  f"{' '.join(f'{a:.2f}' for a in accuracies)}; last training loss {last_loss:.2f}; "
                  f"{len(train)} train / {len(val)} validation slices; {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip
        print(f"crop {size:3d} px: final validation accuracy {np.mean(finals):.3f} +- {np.std(finals, ddof=1):.3f} "
              f"(mean +- sample std over seeds {args.seeds}; chance 0.333)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
