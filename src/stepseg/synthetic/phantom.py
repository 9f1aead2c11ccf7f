"""An analytic whole-body phantom: anatomy, physiological FDG uptake and lesions.

Everything is defined by smooth shapes in millimetres and evaluated at voxel centres of whichever
grid is asked for (PET grid for PET and truth, CT grid for CT), so the two modalities agree in
patient space without any resampling. Shapes are painted in order (later shapes win) and each
one only touches the voxels of its bounding box, which keeps the real 400x400x326 geometry fast.

Coordinates: the *body frame* is patient LPS millimetres (x to the patient's left, y posterior,
z superior) with the vertex at z = 0 and the body axis at x = y = 0. A study's table offset
translates the body frame into scanner LPS coordinates. The reference anatomy is written for an
adult (depth `d` in mm below the vertex, `xr`, `yr` in mm); `scale` shrinks it so that the
vertex-to-mid-thigh range fills the configured PET field of view. Lesion sizes are absolute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# label: (name, HU). Uptake per label is drawn per study in `draw_uptake`.
LABELS = (
    ("air", -1000.0),
    ("fat", -100.0),
    ("muscle", 45.0),
    ("bone", 700.0),
    ("lung", -820.0),
    ("brain", 35.0),
    ("liver", 58.0),
    ("spleen", 48.0),
    ("kidney", 32.0),
    ("renal_pelvis", 10.0),
    ("myocardium", 45.0),
    ("blood", 42.0),
    ("bladder", 8.0),
    ("bowel", 15.0),
    ("tonsil", 50.0),
    ("marrow", 250.0),
    ("lesion", 35.0),
)
LABEL = {name: index for index, (name, _) in enumerate(LABELS)}
HU = np.array([hu for _, hu in LABELS], dtype=np.float32)
REFERENCE_LENGTH_MM = 1000.0  # vertex to mid-thigh of the 1.75 m reference adult
REFERENCE_HALF_WIDTH_MM = 287.0  # body axis to the outside of an arm
LESION_REGIONS = (
    "neck",
    "axilla",
    "mediastinum",
    "lung",
    "liver",
    "abdomen",
    "pelvis",
    "groin",
    "bone",
    "organ_contact",
)
REGION_WEIGHTS = np.array([1.2, 1.0, 1.4, 1.0, 0.9, 1.2, 0.8, 0.8, 0.8, 1.2])


@dataclass(frozen=True)
class Lesion:
    """An analytic lesion in patient LPS millimetres.

    The surface is an ellipsoid (semi-axes `radii_mm` in the frame `rotation`) whose radius is
    modulated by a cubic polynomial of the direction (`lobulation`), so lesions are not perfect
    spheres; `volume_ml` is the exact volume of that solid (computed by quadrature).
    """

    region: str
    center_mm: tuple[float, float, float]  # LPS (x, y, z)
    radii_mm: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]  # rows: lesion axes in LPS
    lobulation: tuple[float, ...]  # 3 linear, 6 quadratic, 1 cubic coefficients
    volume_ml: float
    suv_max: float
    necrotic: bool


@dataclass(frozen=True)
class Ellipsoid:
    label: str
    center: tuple[float, float, float]  # body frame (x, y, z) mm
    semi: tuple[float, float, float]
    site: str = ""  # where bone lesions may sit: spine, pelvis, femur

    def bounds(self) -> np.ndarray:
        c, s = np.asarray(self.center), np.asarray(self.semi)
        return np.stack([c - s, c + s])

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        (cx, cy, cz), (ax, ay, az) = self.center, self.semi
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


@dataclass(frozen=True)
class Cylinder:
    """An elliptic cylinder along z whose semi-axes change linearly from top to bottom.

    With `period_mm`, only slabs of `duty` * period out of every period are filled (ribs).
    """

    label: str
    center_xy: tuple[float, float]
    z_top: float
    z_bottom: float
    semi_top: tuple[float, float]
    semi_bottom: tuple[float, float]
    period_mm: float = 0.0
    duty: float = 1.0

    def bounds(self) -> np.ndarray:
        ax = max(self.semi_top[0], self.semi_bottom[0])
        ay = max(self.semi_top[1], self.semi_bottom[1])
        cx, cy = self.center_xy
        return np.array([[cx - ax, cy - ay, self.z_bottom], [cx + ax, cy + ay, self.z_top]])

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        t = (self.z_top - z) / (self.z_top - self.z_bottom)
        ax = self.semi_top[0] + t * (self.semi_bottom[0] - self.semi_top[0])
        ay = self.semi_top[1] + t * (self.semi_bottom[1] - self.semi_top[1])
        cx, cy = self.center_xy
        result = (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (t >= 0) & (t <= 1)
        if self.period_mm:
            result &= np.mod(self.z_top - z, self.period_mm) < self.duty * self.period_mm
        return result


Shape = Ellipsoid | Cylinder


# ---------------------------------------------------------------- per-patient anatomy


def draw_anatomy(rng: np.random.Generator, sex: str, height_m: float, weight_kg: float) -> dict:
    """Patient-specific shape parameters (independent of the scan geometry)."""
    bmi = weight_kg / height_m**2
    return {
        "height_factor": height_m / 1.75,
        "girth": float(np.clip(np.sqrt(bmi / 23.0), 0.85, 1.18)),
        "fat_mm": float(np.clip(8.0 + (bmi - 22.0) * 2.5, 4.0, 35.0)),
        "liver_size": float(rng.uniform(0.9, 1.1)),
        "heart_size": float(rng.uniform(0.9, 1.1)),
        "kidney_shift_mm": float(rng.uniform(5.0, 25.0)),
        "breast": sex == "F",
        "bowel_loops": [
            (
                float(rng.uniform(-100, 100)),
                float(rng.uniform(-75, 15)),
                float(rng.uniform(670, 830)),
                float(rng.uniform(14, 28)),
            )
            for _ in range(10)
        ],
    }


def body_scale(settings: Mapping[str, Any], anatomy: Mapping[str, Any]) -> tuple[float, float]:
    """(axial scale, in-plane scale) mapping the reference adult into this scan's field of view."""
    shape = np.asarray(settings["pet_shape"], float)
    spacing = np.asarray(settings["pet_spacing_mm"], float)
    fov_z = shape[0] * spacing[0]
    fov_xy = min(shape[1] * spacing[1], shape[2] * spacing[2])
    # vertex to mid-thigh always fits the axial field of view (30 mm to spare)
    scale = min(anatomy["height_factor"], 1.0) * min(1.0, (fov_z - 30.0) / REFERENCE_LENGTH_MM)
    # arms included, the body must fit the transaxial field of view (and the CT's)
    in_plane = min(scale * anatomy["girth"], 0.92 * fov_xy / (2 * REFERENCE_HALF_WIDTH_MM))
    return scale, in_plane


def build_anatomy(settings: Mapping[str, Any], anatomy: Mapping[str, Any]) -> list[Shape]:
    """The ordered list of shapes (later ones overwrite earlier ones) in the body frame."""
    sz, sxy = body_scale(settings, anatomy)
    organ = sxy / anatomy["girth"] * (1.0 + 0.3 * (anatomy["girth"] - 1.0))
    fat = anatomy["fat_mm"]

    def e(
        label: str,
        xr: float,
        yr: float,
        d: float,
        ax: float,
        ay: float,
        az: float,
        k: float = organ,
        site: str = "",
    ) -> Ellipsoid:
        return Ellipsoid(label, (xr * k, yr * k, -d * sz), (ax * k, ay * k, az * sz), site)

    def c(
        label: str,
        xr: float,
        yr: float,
        d_top: float,
        d_bottom: float,
        top: tuple[float, float],
        bottom: tuple[float, float],
        inset: float = 0.0,
        period_mm: float = 0.0,
        duty: float = 1.0,
    ) -> Cylinder:
        return Cylinder(
            label,
            (xr * sxy, yr * sxy),
            -d_top * sz,
            -d_bottom * sz,
            (top[0] * sxy - inset * sz, top[1] * sxy - inset * sz),
            (bottom[0] * sxy - inset * sz, bottom[1] * sxy - inset * sz),
            period_mm * sz,
            duty,
        )

    shapes: list[Shape] = []
    # neck and head
    shapes += [
        c("fat", 0, 10, 180, 300, (55, 58), (68, 66)),
        c("muscle", 0, 10, 180, 300, (55, 58), (68, 66), inset=5),
        e("muscle", 0, 0, 105, 78, 98, 112, k=sxy / anatomy["girth"]),
        e("bone", 0, 0, 103, 72, 92, 105, k=sxy / anatomy["girth"]),
        e("brain", 0, 2, 100, 65, 84, 96, k=sxy / anatomy["girth"]),
        e("tonsil", -18, -10, 225, 8, 10, 12),
        e("tonsil", 18, -10, 225, 8, 10, 12),
        e("tonsil", -42, 5, 195, 14, 18, 22),
        e("tonsil", 42, 5, 195, 14, 18, 22),
    ]
    # trunk: subcutaneous fat, muscle wall, rib cage, thoracic cavity
    shapes += [
        c("fat", 0, 0, 270, 345, (150, 100), (190, 112)),
        c("fat", 0, 0, 345, 910, (190, 112), (178, 120)),
        c("muscle", 0, 0, 270, 345, (150, 100), (190, 112), inset=fat),
        c("muscle", 0, 0, 345, 910, (190, 112), (178, 120), inset=fat),
    ]
    if anatomy["breast"]:
        shapes += [
            e("fat", -75, -100, 430, 60, 40, 55, k=sxy),
            e("fat", 75, -100, 430, 60, 40, 55, k=sxy),
        ]
    shapes += [
        c("bone", 0, 0, 330, 580, (168, 100), (172, 104), inset=fat, period_mm=26.0, duty=0.38),
        c("muscle", 0, 0, 330, 580, (158, 90), (162, 94), inset=fat),
        e("bone", 0, -90, 420, 15, 8, 80),
        e("bone", -110, 80, 380, 55, 8, 70),
        e("bone", 110, 80, 380, 55, 8, 70),
    ]
    # arms (down, beside the trunk) and legs
    for side in (-1, 1):
        shapes += [
            c("fat", side * 245, 0, 300, 830, (42, 46), (36, 38)),
            c("muscle", side * 245, 0, 300, 830, (42, 46), (36, 38), inset=4),
            c("bone", side * 245, 5, 320, 560, (10, 10), (10, 10)),
            c("bone", side * 245, 0, 590, 810, (8, 8), (7, 7)),
            c("fat", side * 95, 5, 880, 1200, (88, 92), (68, 74)),
            c("muscle", side * 95, 5, 880, 1200, (88, 92), (68, 74), inset=fat * 0.8),
            c("bone", side * 100, 5, 900, 1200, (14, 14), (13, 13)),
            e("bone", side * 95, 5, 895, 24, 24, 24, site="femur"),
        ]
    # thorax
    shapes += [
        e("lung", -80, 5, 430, 62, 78, 125),
        e("lung", 80, 5, 430, 62, 78, 125),
    ]
    heart = anatomy["heart_size"]
    shapes += [
        e("myocardium", 25, -25, 465, 55 * heart, 48 * heart, 58 * heart),
        e("blood", 25, -25, 465, 38 * heart, 32 * heart, 42 * heart),
    ]
    # abdomen
    liver = anatomy["liver_size"]
    shift = anatomy["kidney_shift_mm"]
    shapes += [
        e("liver", -70, -5, 565, 95 * liver, 85 * liver, 80 * liver),
        e("spleen", 95, 40, 560, 35, 45, 55),
        e("bowel", 50, -40, 565, 50, 35, 45),
        e("kidney", -70, 60, 650 + shift, 30, 32, 55),
        e("renal_pelvis", -62, 55, 650 + shift, 10, 12, 20),
        e("kidney", 70, 60, 640, 30, 32, 55),
        e("renal_pelvis", 62, 55, 640, 10, 12, 20),
    ]
    shapes += [e("bowel", x, y, d, r, r * 0.8, r * 1.2) for x, y, d, r in anatomy["bowel_loops"]]
    # pelvis
    shapes += [
        e("bone", -100, 45, 790, 55, 18, 60, site="pelvis"),
        e("bone", 100, 45, 790, 55, 18, 60, site="pelvis"),
        e("bone", 0, 75, 810, 40, 18, 50, site="pelvis"),
        e("bladder", 0, -40, 865, 45, 38, 38),
    ]
    # last, so that nothing cuts into them: aorta, then the spine (vertebral bodies with cortex
    # and marrow, spinous processes)
    shapes.append(c("blood", 10, 40, 420, 800, (13, 13), (12, 12)))
    for d in np.arange(200.0, 830.0, 27.0):
        y = float(np.interp(d, [200, 350, 600, 830], [20, 75, 70, 55]))
        shapes += [
            e("bone", 0, y, d, 20, 18, 12),
            e("marrow", 0, y, d, 16, 14, 9, site="spine"),
            e("bone", 0, y + 32, d, 6, 14, 9),
        ]
    return shapes


def organ_shapes(shapes: Sequence[Shape], label: str) -> list[Ellipsoid]:
    return [s for s in shapes if isinstance(s, Ellipsoid) and s.label == label]


# ---------------------------------------------------------------- scan geometry


@dataclass(frozen=True)
class Grid:
    """An axis-aligned grid: voxel (k, j, i) sits at origin + (i*dx, j*dy, k*dz) in LPS mm."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel (0, 0, 0), the inferior slice

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ascending LPS x, y, z coordinates of the voxel centres."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.spacing
        ox, oy, oz = self.origin
        return ox + dx * np.arange(nx), oy + dy * np.arange(ny), oz + dz * np.arange(nz)

    def ras_affine(self) -> np.ndarray:
        """NIfTI affine for the (z, y, x) array saved by stepseg.nifti (LPS -> RAS flips x, y)."""
        dz, dy, dx = self.spacing
        ox, oy, oz = self.origin
        return np.array(
            [[-dx, 0, 0, -ox], [0, -dy, 0, -oy], [0, 0, dz, oz], [0, 0, 0, 1]], dtype=float
        )


@dataclass(frozen=True)
class ScanGeometry:
    pet: Grid
    ct: Grid
    table_offset: tuple[float, float, float]  # LPS = body frame + offset


def scan_geometry(rng: np.random.Generator, settings: Mapping[str, Any]) -> ScanGeometry:
    """PET and CT grids of one study: different spacing, extent and centre, as on a scanner."""
    pet_shape = tuple(int(v) for v in settings["pet_shape"])
    pet_spacing = tuple(float(v) for v in settings["pet_spacing_mm"])
    ct_shape = tuple(int(v) for v in settings["ct_shape"])
    ct_spacing = tuple(float(v) for v in settings["ct_spacing_mm"])
    pet_fov = np.array(pet_shape, float) * pet_spacing
    ct_fov = np.array(ct_shape, float) * ct_spacing
    # vertex a little below the top PET slice; the table sits at a scanner-specific z
    vertex_z = float(rng.uniform(-400.0, -100.0))
    top_margin = float(rng.uniform(5.0, 25.0))
    offset = (float(rng.uniform(-12, 12)), float(rng.uniform(-20, 10)), vertex_z)
    pet_top = vertex_z + top_margin
    pet_origin = (
        -(pet_shape[2] - 1) * pet_spacing[2] / 2,
        -(pet_shape[1] - 1) * pet_spacing[1] / 2,
        pet_top - (pet_shape[0] - 1) * pet_spacing[0],
    )
    # CT: centred on the PET volume, shifted by up to half the difference in extent (or 4 mm)
    slack = np.maximum((ct_fov - pet_fov) / 2, 4.0)
    shift = rng.uniform(-1, 1, 3) * slack  # (z, y, x)
    pet_centre = np.array(pet_origin) + (np.array(pet_shape[::-1]) - 1) * pet_spacing[::-1] / 2
    ct_centre = pet_centre + shift[::-1]
    ct_origin = ct_centre - (np.array(ct_shape[::-1]) - 1) * np.array(ct_spacing[::-1]) / 2
    return ScanGeometry(
        pet=Grid(pet_shape, pet_spacing, tuple(float(v) for v in np.round(pet_origin, 3))),
        ct=Grid(ct_shape, ct_spacing, tuple(float(v) for v in np.round(ct_origin, 3))),
        table_offset=offset,
    )


# ---------------------------------------------------------------- lesions


def _fibonacci_sphere(n: int = 4096) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], -1
    )


SPHERE = _fibonacci_sphere()


def _lobulation_terms(u: np.ndarray) -> np.ndarray:
    """Direction polynomials (last axis: x, y, z) that modulate a lesion's radius."""
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    return np.stack(
        [x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z, x * y * z], -1
    )


def _make_lesion(
    rng: np.random.Generator, region: str, center: np.ndarray, volume_ml: float, suv_max: float
) -> Lesion:
    ratios = rng.uniform(0.7, 1.3, 3)
    lobulation = rng.normal(0.0, 0.07, 10)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))
    # exact volume of the lobulated solid by quadrature over directions, then rescale to target
    radial = 1.0 + _lobulation_terms(SPHERE) @ lobulation
    unit_volume = 4.0 / 3.0 * np.pi * float(np.mean(radial**3)) * float(np.prod(ratios))
    scale = (volume_ml * 1000.0 / unit_volume) ** (1 / 3)
    return Lesion(
        region=region,
        center_mm=tuple(float(v) for v in center),
        radii_mm=tuple(float(v) for v in ratios * scale),
        rotation=tuple(tuple(float(v) for v in row) for row in rotation),
        lobulation=tuple(float(v) for v in lobulation),
        volume_ml=float(volume_ml),
        suv_max=float(suv_max),
        necrotic=bool(volume_ml > 15.0 and rng.random() < 0.4),
    )


def _region_centre(
    rng: np.random.Generator,
    region: str,
    shapes: Sequence[Shape],
    sz: float,
    sxy: float,
    radius: float,
) -> np.ndarray:
    side = rng.choice([-1.0, 1.0])

    def ref(xr: float, yr: float, d: float) -> np.ndarray:
        return np.array([xr * sxy, yr * sxy, -d * sz])

    def within(shape: Ellipsoid, fraction: float) -> np.ndarray:
        u = rng.normal(size=3)
        u *= rng.uniform(0, 1) ** (1 / 3) * fraction / np.linalg.norm(u)
        return np.asarray(shape.center) + u * np.asarray(shape.semi)

    if region == "neck":
        return ref(side * rng.uniform(25, 45), rng.uniform(-20, 15), rng.uniform(215, 290))
    if region == "axilla":
        return ref(side * rng.uniform(130, 160), rng.uniform(-10, 40), rng.uniform(310, 370))
    if region == "mediastinum":
        return ref(rng.uniform(-25, 35), rng.uniform(-60, 25), rng.uniform(360, 440))
    if region == "abdomen":
        return ref(rng.uniform(-50, 50), rng.uniform(0, 50), rng.uniform(600, 760))
    if region == "pelvis":
        return ref(side * rng.uniform(40, 80), rng.uniform(-20, 30), rng.uniform(790, 860))
    if region == "groin":
        return ref(side * rng.uniform(70, 110), rng.uniform(-70, -35), rng.uniform(880, 930))
    if region in ("lung", "liver"):
        organs = organ_shapes(shapes, region)
        return within(organs[rng.integers(len(organs))], 0.75)
    if region == "bone":
        bones = [s for s in shapes if isinstance(s, Ellipsoid) and s.site]
        return within(bones[rng.integers(len(bones))], 0.5)
    # organ_contact: on the surface of a high-uptake organ, pushed out so the lesion touches it
    candidates = [
        s
        for label in ("kidney", "bladder", "myocardium", "spleen", "liver")
        for s in organ_shapes(shapes, label)
    ]
    organ = candidates[rng.integers(len(candidates))]
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    surface = np.asarray(organ.center) + u * np.asarray(organ.semi)
    normal = u / np.asarray(organ.semi)
    normal /= np.linalg.norm(normal)
    return surface + normal * 0.6 * radius


def draw_lesions(
    rng: np.random.Generator,
    settings: Mapping[str, Any],
    anatomy: Mapping[str, Any],
    previous: Sequence[Lesion],
) -> tuple[Lesion, ...]:
    """1-6 lesions in lymph-node regions, lung, liver, bone and next to busy organs.

    A follow-up study starts from the previous lesions: each may disappear, shrink or grow and
    change its uptake; new lesions may appear.
    """
    shapes = build_anatomy(settings, anatomy)
    sz, sxy = body_scale(settings, anatomy)
    vmin, vmax = (float(v) for v in settings["lesion_volume_ml"])
    nmin, nmax = (int(v) for v in settings["lesions_per_study"])

    def new(count: int) -> list[Lesion]:
        result = []
        for _ in range(count):
            region = str(rng.choice(LESION_REGIONS, p=REGION_WEIGHTS / REGION_WEIGHTS.sum()))
            volume = float(np.exp(rng.uniform(np.log(vmin), np.log(vmax))))
            suv_max = float(np.exp(rng.uniform(np.log(2.5), np.log(20.0))))
            radius = (volume * 1000 * 3 / (4 * np.pi)) ** (1 / 3)
            centre = _region_centre(rng, region, shapes, sz, sxy, radius)
            result.append(_make_lesion(rng, region, centre, volume, suv_max))
        return result

    if not previous:
        return tuple(new(int(rng.integers(nmin, nmax + 1))))
    kept = []
    for lesion in previous:
        if rng.random() < 0.15:
            continue
        volume = float(np.clip(lesion.volume_ml * rng.lognormal(0.0, 0.5), vmin, vmax))
        suv_max = float(np.clip(lesion.suv_max * rng.uniform(0.6, 1.4), 2.5, 20.0))
        kept.append(_make_lesion(rng, lesion.region, np.asarray(lesion.center_mm), volume, suv_max))
    room = nmax - len(kept)
    extra = int(rng.random() < 0.3) if room > 0 else 0
    if not kept:
        extra = max(extra, nmin)
    return tuple(kept + new(min(extra, room)))


def lesion_values(
    lesion: Lesion, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(inside mask, SUV) of a lesion at points given as broadcastable body-frame coordinates.

    Uptake is highest in the centre and falls to 55% of SUVmax at the rim; large lesions may
    have a necrotic (cold) core, as lymphoma and lung cancer often do.
    """
    offset = np.stack(
        np.broadcast_arrays(
            x - lesion.center_mm[0], y - lesion.center_mm[1], z - lesion.center_mm[2]
        ),
        -1,
    )
    q = offset @ np.asarray(lesion.rotation).T / np.asarray(lesion.radii_mm)
    rho = np.linalg.norm(q, axis=-1)
    u = q / np.maximum(rho, 1e-9)[..., None]
    boundary = 1.0 + _lobulation_terms(u) @ np.asarray(lesion.lobulation)
    t = rho / boundary
    inside = t <= 1.0
    suv = lesion.suv_max * (0.55 + 0.45 * (1.0 - np.minimum(t, 1.0) ** 2))
    if lesion.necrotic:
        suv = np.where(t < 0.45, 0.35 * lesion.suv_max, suv)
    return inside, suv


def _lesion_bounds(lesion: Lesion) -> np.ndarray:
    reach = max(lesion.radii_mm) * (1.0 + float(np.sum(np.abs(lesion.lobulation))))
    c = np.asarray(lesion.center_mm)
    return np.stack([c - reach, c + reach])


# ---------------------------------------------------------------- uptake and rendering


def draw_uptake(rng: np.random.Generator) -> np.ndarray:
    """Mean SUV per label for one study: organs that a plain threshold mistakes for lesions."""
    ranges = {
        "air": (0.0, 0.0),
        "fat": (0.25, 0.45),
        "muscle": (0.6, 1.0),
        "bone": (0.6, 0.9),
        "lung": (0.35, 0.6),
        "brain": (8.0, 15.0),
        "liver": (2.0, 3.0),
        "spleen": (1.7, 2.6),
        "kidney": (4.0, 10.0),
        "renal_pelvis": (10.0, 30.0),
        "myocardium": (3.0, 12.0),
        "blood": (1.4, 2.2),
        "bladder": (10.0, 20.0),
        "bowel": (1.2, 4.0),
        "tonsil": (2.5, 5.0),
        "marrow": (1.5, 2.5),
        "lesion": (0.0, 0.0),  # set per lesion
    }
    return np.array([rng.uniform(*ranges[name]) for name, _ in LABELS], dtype=np.float32)


def uptake_texture(
    rng: np.random.Generator, grid: Grid, knot_mm: float = 40.0, spread: float = 0.1
) -> np.ndarray:
    """A smooth multiplicative field (about 1) so that organs are not flat.

    Lognormal values on knots every `knot_mm`, interpolated linearly along each axis; the
    interpolation is separable, so it costs three small matrix products at any grid size.
    """
    weights = []
    for axis in grid.axes()[::-1]:  # z, y, x
        knots = np.arange(axis[0], axis[-1] + knot_mm, knot_mm)
        hats = [np.interp(axis, knots, row) for row in np.eye(len(knots))]
        weights.append(np.stack(hats, axis=1).astype(np.float32))  # (voxels, knots)
    coarse = rng.lognormal(0.0, spread, [w.shape[1] for w in weights]).astype(np.float32)
    return np.einsum("abc,za,yb,xc->zyx", coarse, *weights, optimize=True)


def _index_range(axis: np.ndarray, low: float, high: float) -> slice:
    return slice(int(np.searchsorted(axis, low, "left")), int(np.searchsorted(axis, high, "right")))


def render(
    grid: Grid,
    table_offset: Sequence[float],
    shapes: Sequence[Shape],
    lesions: Sequence[Lesion],
    uptake: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Point-sample the phantom at the grid's voxel centres.

    Returns (label map uint8, SUV float32 or None when `uptake` is None, lesion mask bool), all
    (z, y, x). Lesion SUVs replace organ uptake where a lesion is present.
    """
    lx, ly, lz = grid.axes()
    axes = (lx - table_offset[0], ly - table_offset[1], lz - table_offset[2])  # body frame
    labels = np.zeros(grid.shape, dtype=np.uint8)
    lesion_mask = np.zeros(grid.shape, dtype=bool)
    # the CT's labels need no SUV (at the collection's CT grid, 350 MB saved)
    lesion_suv = None if uptake is None else np.zeros(grid.shape, dtype=np.float32)

    def paint(bounds: np.ndarray) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        sx, sy, sz = (
            _index_range(a, lo, hi) for a, lo, hi in zip(axes, bounds[0], bounds[1], strict=True)
        )
        if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
            return None
        coords = (
            axes[0][sx][None, None, :],
            axes[1][sy][None, :, None],
            axes[2][sz][:, None, None],
        )
        return (sz, sy, sx), coords

    for shape in shapes:
        found = paint(shape.bounds())
        if found is not None:
            window, coords = found
            labels[window][shape.inside(*coords)] = LABEL[shape.label]
    for lesion in lesions:
        found = paint(_lesion_bounds(lesion))
        if found is not None:
            window, coords = found
            inside, suv = lesion_values(lesion, *coords)
            inside &= labels[window] != LABEL["air"]  # a lesion never pokes out of the body
            if not inside.any():  # smaller than a voxel here: keep the voxel at its centre
                nearest = tuple(
                    int(np.argmin(np.abs(c - lesion.center_mm[i]))) for i, c in enumerate(coords)
                )
                inside[nearest[::-1]] = labels[window][nearest[::-1]] != LABEL["air"]
            labels[window][inside] = LABEL["lesion"]
            lesion_mask[window] |= inside
            if lesion_suv is not None:
                lesion_suv[window] = np.where(
                    inside, np.maximum(lesion_suv[window], suv), lesion_suv[window]
                )
    if lesion_suv is None:
        return labels, None, lesion_mask
    suv_map = uptake[labels]
    suv_map[lesion_mask] = lesion_suv[lesion_mask]
    return labels, suv_map, lesion_mask
