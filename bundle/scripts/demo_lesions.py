"""Synthetic gliomas for the demo: a 3D lesion in white matter whose T1 appearance is typical of its grade.

A lesion lives in template space (``scripts.demo_anatomy``), so it moves and deforms with its patient's
anatomy. Three kinds, named after the grade whose textbook appearance they have:

* ``II``: ill-defined, homogeneous, mildly hypointense on T1, no enhancement, little mass effect;
* ``III``: larger, heterogeneous, patchy enhancement, a thin rim of oedema, some mass effect;
* ``IV``: an enhancing ring around a dark necrotic core, oedema around it, and mass effect that pushes the
  neighbouring tissue (ventricles, cortex) away.

The kind is the only thing about a patient's images that depends on the grade: size, shape, position, mass
effect and texture are all drawn from the kind's distribution, never from the clinical grade. A patient
whose lesion "looks like a neighbouring grade" (``scripts.demo_data``'s difficulty knob) is therefore drawn
exactly like the patients of that grade, which is what makes the demo's best achievable accuracy known.

Mass effect: the tissue now at distance ``r`` from the centre came from ``r - d(r)``, ``d`` growing
linearly inside the tumour and falling off as ``(R/r)^2`` outside it, tapered to zero at 2.6 radii, a
monotonic (fold-free) push. The lesion's own signal is blended over the displaced tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LESION_KINDS", "KIND_MODELS", "Lesion", "LesionKind", "draw_lesion", "render"]

LESION_KINDS = ("II", "III", "IV")


@dataclass(frozen=True)
class LesionKind:
    """How one kind of lesion is drawn. Radii in mm; ``edge`` is the border's softness and ``irregularity`` the
    depth of its lobes, both as fractions of the radius; ``mass_effect`` is the push at the border as a fraction
    of the radius; ``oedema`` the outer radius of the oedema in radii (1: none)."""

    radius: tuple[float, float]
    edge: float
    irregularity: float
    mass_effect: float
    oedema: float


KIND_MODELS = {
    "II": LesionKind(radius=(16.0, 22.0), edge=0.12, irregularity=0.06, mass_effect=0.10, oedema=1.0),
    "III": LesionKind(radius=(18.0, 24.0), edge=0.05, irregularity=0.18, mass_effect=0.20, oedema=1.25),
    "IV": LesionKind(radius=(18.0, 25.0), edge=0.04, irregularity=0.14, mass_effect=0.30, oedema=1.6),
}
_TEXTURE_WAVES = 12
_TAPER = (1.8, 2.6)  # mass effect fades out between these distances (in radii)


@dataclass(frozen=True)
class Lesion:
    """One patient's lesion: kind, centre (template RAS mm), radius (mm), an ellipsoid ``shape`` (3x3, unit
    determinant), boundary lobes and two random textures (``waves``: ``(3, K, 4)`` wave vectors and phases)."""

    kind: str
    centre: np.ndarray
    radius: float
    shape: np.ndarray
    lobes: np.ndarray
    waves: np.ndarray

    @property
    def model(self) -> LesionKind:
        return KIND_MODELS[self.kind]

    @property
    def reach(self) -> float:
        """Distance (mm) beyond which the lesion changes nothing: the mass effect's taper, the oedema, the lobes."""
        stretch = float(np.linalg.norm(np.linalg.inv(self.shape), 2)) * (1 + 2 * self.model.irregularity)
        return self.radius * stretch * max(_TAPER[1], self.model.oedema + 4 * self.model.edge)

    def _offsets(self, points: torch.Tensor) -> torch.Tensor:
        return points - torch.from_numpy(self.centre.astype(np.float32))

    def normalised_radius(self, points: torch.Tensor) -> torch.Tensor:
        """1.0 on the (lobed, ellipsoidal) tumour border, 0 at the centre."""
        local = self._offsets(points) @ torch.from_numpy(self.shape.astype(np.float32)).T
        distance = local.norm(dim=-1).clamp_min(1e-6)
        direction = local / distance[..., None]
        lobes = torch.from_numpy(self.lobes.astype(np.float32))  # (L, 4): unit vector, phase
        bumps = torch.sin(3.0 * direction @ lobes[:, :3].T + lobes[:, 3]).mean(-1) * np.sqrt(2.0)
        return distance / (self.radius * (1.0 + self.model.irregularity * bumps))

    def displace(self, points: torch.Tensor) -> torch.Tensor:
        """Where the tissue now at ``points`` was before the tumour pushed it (template RAS mm)."""
        offsets = self._offsets(points)
        r = offsets.norm(dim=-1).clamp_min(1e-6) / self.radius
        push = torch.where(r < 1.0, r, 1.0 / r**2) * self.model.mass_effect
        lo, hi = _TAPER
        t = ((r - lo) / (hi - lo)).clamp(0.0, 1.0)
        push = push * (1 - t * t * (3 - 2 * t))  # smoothstep taper
        return points - offsets * (push / r)[..., None]

    def texture(self, points: torch.Tensor, which: int) -> torch.Tensor:
        """A smooth random field, about standard normal, with structure on a 4-10 mm scale."""
        waves = torch.from_numpy(self.waves[which].astype(np.float32))  # (K, 4): wave vector, phase
        return torch.cos(self._offsets(points) @ waves[:, :3].T + waves[:, 3]).sum(-1) * np.sqrt(2.0 / len(waves))

    def components(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights in 0..1 at template points: ``tumour`` (all of it), ``core`` (necrosis, IV), ``enhancing``
        (ring of IV, patches of III), ``oedema`` (outside the tumour) and ``texture`` (heterogeneity)."""
        model = self.model
        rho = self.normalised_radius(points)
        tumour = torch.sigmoid((1.0 - rho) / model.edge)
        zeros = torch.zeros_like(rho)
        core, enhancing, texture = zeros, zeros, self.texture(points, 0)
        if self.kind == "IV":
            core_radius = 0.62 + 0.06 * self.texture(points, 1)  # the ring's thickness varies
            core = torch.sigmoid((core_radius - rho) / model.edge)
            enhancing = (tumour - core).clamp(0.0, 1.0)
        elif self.kind == "III":
            patches = torch.sigmoid((self.texture(points, 1) - 0.6) / 0.15)
            enhancing = patches * torch.sigmoid((0.85 - rho) / model.edge)
        oedema = zeros
        if model.oedema > 1.0:
            oedema = (torch.sigmoid((model.oedema - rho) / 0.08) - tumour).clamp(0.0, 1.0)
        return {"tumour": tumour, "core": core, "enhancing": enhancing, "oedema": oedema, "texture": texture}


def draw_lesion(kind: str, rng: np.random.Generator, sites: np.ndarray) -> Lesion:
    """A random lesion of ``kind`` centred at one of ``sites`` (template RAS mm, deep white matter)."""
    if kind not in KIND_MODELS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose one of {LESION_KINDS}")
    model = KIND_MODELS[kind]
    if len(sites) == 0:
        raise ValueError("no white-matter site to place a lesion in")
    centre = np.asarray(sites[int(rng.integers(len(sites)))], dtype=np.float64)
    axes = rng.uniform(0.8, 1.25, size=3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    shape = q @ np.diag(axes / np.prod(axes) ** (1 / 3)) @ q.T
    directions = rng.standard_normal((5, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lobes = np.concatenate([directions, rng.uniform(0, 2 * np.pi, (5, 1))], axis=1)
    wavelengths = rng.uniform(4.0, 10.0, size=(2, _TEXTURE_WAVES, 1))
    vectors = rng.standard_normal((2, _TEXTURE_WAVES, 3))
    vectors *= 2 * np.pi / wavelengths / np.linalg.norm(vectors, axis=-1, keepdims=True)
    waves = np.concatenate([vectors, rng.uniform(0, 2 * np.pi, (2, _TEXTURE_WAVES, 1))], axis=-1)
    return Lesion(kind, centre, float(rng.uniform(*model.radius)), shape, lobes, waves)


# Signal of the lesion's parts per contrast, white matter = 1 (T1 from the template, T2/FLAIR from tissue maps).
_APPEARANCE = {
    #        tumour (II, III, IV), core, enhancing, oedema factor, texture depth
    "t1": {"tumour": {"II": 0.55, "III": 0.52, "IV": 0.70}, "core": 0.25, "enhancing": 1.40, "oedema": 0.80,
           "texture": {"II": 0.03, "III": 0.15, "IV": 0.05}},
    "t2": {"tumour": {"II": 1.45, "III": 1.50, "IV": 1.30}, "core": 1.90, "enhancing": 1.10, "oedema": 1.45,
           "texture": {"II": 0.04, "III": 0.15, "IV": 0.06}},
    "flair": {"tumour": {"II": 1.40, "III": 1.45, "IV": 1.30}, "core": 0.45, "enhancing": 1.15, "oedema": 1.40,
              "texture": {"II": 0.04, "III": 0.15, "IV": 0.06}},
}  # fmt: skip


def render(base: torch.Tensor, kind: str, parts: dict[str, torch.Tensor], contrast: str) -> torch.Tensor:
    """Blend a lesion's parts over the (displaced) tissue signal ``base`` for a contrast: t1, t2 or flair."""
    look = _APPEARANCE[contrast]
    tumour_value = look["tumour"][kind] + look["texture"][kind] * parts["texture"]
    out = base * (1 - (1 - look["oedema"]) * parts["oedema"])
    out = torch.lerp(out, tumour_value, parts["tumour"])
    out = torch.lerp(out, torch.full_like(out, look["enhancing"]), parts["enhancing"])
    core_value = look["core"] + 0.05 * parts["texture"]
    return torch.lerp(out, core_value, parts["core"])
