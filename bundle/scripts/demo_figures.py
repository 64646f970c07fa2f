"""The README's picture of the demo data: sagittal T1 slices of each grade with the lesion outlined.

For the first plain (non-mimic) patient of each grade it shows the slice with the most tumour, a slice two
positions beside it (where the lesion is small or gone, yet the slice carries the grade), and outlines the
tumour (red) and oedema (yellow) from the masks the generator wrote (``masks/masks.csv``)::

    python -m scripts.demo_figures ~/.cache/sdl_glioma/demo docs/images/demo_slices.png
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from scripts.reports import new_figure, save_figure

__all__ = ["demo_slices_figure"]


def _slices_of(root: Path, patient_id: str) -> list[dict]:
    with open(root / "masks" / "masks.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["patient_id"] == patient_id]


def demo_slices_figure(demo_root: str | Path, out_png: str | Path, offset: int = 2) -> Path:
    """Write a 3 x 2 grid (grade II, III, IV; lesion slice, slice ``offset`` positions away) to ``out_png``."""
    root = Path(demo_root)
    info = json.loads((root / "demo_info.json").read_text())
    fig, axes = new_figure(3, 2, figsize=(6.4, 9.6))
    for row, grade in zip(axes, ("II", "III", "IV"), strict=True):
        patient = next(p for p in info["patients"] if p["grade"] == grade and not p["mimic"])
        slices = _slices_of(root, patient["patient_id"])
        centre = int(np.argmax([int(s["tumour_pixels"]) for s in slices]))
        beside = min(centre + offset, len(slices) - 1) if centre + offset < len(slices) else centre - offset
        for ax, index in zip(row, (centre, beside), strict=True):
            image = pydicom.dcmread(root / slices[index]["image"]).pixel_array.astype(np.float32)
            mask = np.asarray(Image.open(root / slices[index]["mask"]))
            ax.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(image, 99.5))
            for label, colour in ((1, "red"), (2, "yellow")):
                if (mask == label).any():
                    ax.contour(mask == label, levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"grade {grade}, {patient['patient_id']}, slice {index + 1}", fontsize=8)
            ax.axis("off")
    fig.suptitle("SYNTHETIC demo data (ICBM 2009a anatomy): tumour red, oedema yellow", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=80)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m scripts.demo_figures DEMO_DIR OUT.png")
    print(demo_slices_figure(sys.argv[1], sys.argv[2]))
