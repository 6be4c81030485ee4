"""Synthetic coronal T1-weighted hip MRI with avascular necrosis (AVN) of the femoral head.

There is no public AVN data set, so avn-study ships this generator. It is built to be hard in the ways
the real task is hard (Pham et al., BVM 2020): the lesion is small in a large field of view, its contrast
varies, and necrosis-like dark spots lie outside the femoral head where only localisation can reject them.

Generator. Each patient is a set of signed-distance primitives in a patient frame (mm; x to the right,
y anterior, z superior; origin midway between the femoral head centres). A primitive is evaluated only
inside its bounding box and painted with an anti-aliased edge, back to front.

* Anatomy: subcutaneous fat around muscle (the body envelope scaled per patient by ``body_scale``),
  pelvic fat with bowel loops, bladder, the crotch below; pelvis (ilium, ischium, pubis, acetabular
  cups); two femoral heads, ellipsoids (longest semi-axis from ``head_radius_mm``, the others
  ``head_ellipticity`` of it, slightly rotated), cartilage and joint space, necks at a per-hip
  neck-shaft angle and anteversion, greater and lesser trochanters, metaphysis and shaft. Bone has a
  dark cortex around fatty marrow; a faint physeal scar crosses the head. T1 contrast (fatty marrow
  ~0.95): fat 1.0, pelvic marrow 0.72, muscle 0.36, cartilage 0.28, urine 0.12, cortex 0.05, air 0.
* Necrosis: per patient bilateral, unilateral or none. A lesion is the level set ``g < tau`` of an
  ellipsoidal distance from an antero-superior (weight-bearing) centre plus a smooth random field
  (a sum of random plane waves); ``tau`` is the quantile that makes the lesion the drawn fraction of the
  head volume, so the fraction is exact on a 1 mm grid. It is clipped to the head and has a dark rim
  (about ``rim_thickness_mm`` thick, never brighter than the interior) around a low-signal interior;
  ``p_no_rim`` of the lesions have no rim (the band-like demarcation is missing in early or subtle
  lesions). Advanced disease: a lesion of at least ``collapse_fraction`` of the head flattens the
  weight-bearing dome (two tilted planes cut ``collapse_depth_mm`` into it, a faceted outline with a
  dark subchondral plate), as in ARCO stage III collapse.
* In-head mimics (not necrosis; label 1 in the head, 0 in the neck), modelled on the T1 differential
  diagnosis of AVN: bone-marrow oedema (diffuse, soft-edged low signal over head and neck, no rim;
  extra likely beside a lesion, ``oedema_with_lesion``), subchondral cysts (small, round, sharp,
  darker than a lesion, no rim, under the weight-bearing surface), bone islands (enostoses: dense bone,
  as dark as cortex, round or oval) and the fovea capitis (the pit of the ligamentum teres, a dark notch
  at the medial head surface, visible in ``fovea_visible`` of the hips). ``mimic_mean`` per hip
  (Poisson). They are drawn from their own random stream, so the rest of a case does not move when
  the mimic knobs change.
* Distractors (Poisson count): dark blobs in trochanter, neck, metaphysis, supra-acetabular, ischial
  and pubic marrow (lesion-like with probability ``distractor_likeness``: same contrast and rim), dark
  tubes (vessels, flow void) and fluid collections (bursae); all kept outside the femoral heads.
* Acquisition: a coronal slab of thick slices (the A/P axis), per-case in-plane and slice spacing, pose
  (rotation about each axis; position drawn with ``position_sd_mm`` = 15 mm SD left-right and
  up-down, clipped at ``translation_mm``; ``off_centre_fraction`` of the cases a further 15-25 mm to one
  side, where a centre crop may cut a head), and scanner table position (affine origin). Partial
  volume: ``sub_slices`` sub-slices per slice are averaged (labels at the slice centre), then an
  in-plane Gaussian blur. Then mild multiplicative texture (marrow heterogeneity), a smooth bias
  field, Rician noise (magnitude of signal plus complex Gaussian noise) at a per-case SNR, a per-scan
  intensity scale, int16 storage, and a scanner-like orientation for a fraction of cases
  (axis-aligned, never oblique; reading back with ``io_orientation``/``apply_orientation`` gives
  exactly the RAS array).
* Label noise (``label_noise``, off by default): each necrosis component of the annotation grows or
  shrinks by one voxel, and a small one (< 100 voxels) is missed with probability 0.3; the image does
  not change.
* Follow-ups: with ``followup_fraction`` a patient gets a second scan with the same anatomy, lesions and
  distractors but a new pose, spacing, noise, bias and orientation.

Labels: 0 background, 1 femoral head (the whole head sphere, both sides), 2 necrosis (with its rim,
always inside the head). Randomness: a patient's anatomy, its first scan and its follow-up use three
streams spawned from ``np.random.SeedSequence([seed, index])``, so a case never depends on cohort size.
Distractors are drawn last from the anatomy stream and the orientation last from the scan stream, so
changing ``distractor_*`` or ``non_ras_fraction`` leaves the rest of a case unchanged (tests rely on it).

Difficulty knobs (:class:`PhantomConfig`): ``lesion_contrast`` (interior/marrow ratio, near 1 =
subtle), ``rim_darkness`` and ``rim_thickness_mm`` (rim visibility), ``lesion_fraction`` (size),
``lesion_irregularity`` (shape), ``snr``, ``bias_strength``, ``texture``, ``distractor_mean`` and
``distractor_likeness``, ``sub_slices`` and ``blur_mm`` (partial volume), ``slice_spacing_mm``;
``p_bilateral``/``p_unilateral`` (healthy hips are the rest), ``non_ras_fraction``, pose ranges.

What the phantom does not model: real anatomical variability beyond ellipsoids, capsules and
level sets (no osteophytes, no dysplastic or post-surgical hips), joint effusion and synovitis,
subchondral fracture lines (the crescent sign), osteoarthritis, red-marrow reconversion patterns,
STIR/T2/fat-saturated or other sequences, patient motion, wrap-around, chemical shift, vendor-specific
artifacts and reconstruction filters, k-space truncation (Gibbs), partial volume between in-plane
voxels beyond anti-aliased edges and a Gaussian blur, oblique slices, and the clinical staging of
lesions beyond the collapse flag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from avn_study.data.layout import DATASET_JSON, IMAGES_TR, LABELS_TR
from avn_study.data.nifti import write_nifti

__all__ = ["PhantomCase", "PhantomConfig", "iter_cohort", "synth_case", "write_cohort"]

_F = np.float32
_RAS = nio.axcodes2ornt(("R", "A", "S"))
_NON_RAS = ("LPS", "LSP", "RIA")  # scanner-like stored orientations (the last two are coronal-native)
_FOV_Z_OFFSET = 15.0  # the FOV centre lies this far above the femoral heads (more pelvis than thigh)
_FAT, _MUSCLE, _CARTILAGE, _CORTEX, _PELVIC_MARROW = 1.0, 0.36, 0.28, 0.05, 0.72
_MARROW = {"head": 0.95, "neck": 0.92, "gt": 0.93, "lt": 0.9, "meta": 0.9, "shaft": 0.85}
_SITES = {
    "trochanter": 0.25,
    "neck": 0.12,
    "metaphysis": 0.08,
    "supra_acetabular": 0.2,
    "ischium_pubis": 0.1,
    "vessel": 0.15,
    "fluid": 0.1,
}  # distractor sites and their weights


@dataclass(frozen=True)
class PhantomConfig:
    """Every knob of the phantom; the defaults make the default cohort. Pairs are (lo, hi) ranges."""

    fov_mm: tuple[float, float] = (300.0, 220.0)  # in-plane FOV, R/L x S/I; trochanters fit inside
    ap_coverage_mm: tuple[float, float] = (80.0, 90.0)  # A/P extent of the coronal slab
    inplane_spacing_mm: tuple[float, float] = (0.9, 1.2)  # R/L and S/I spacing, drawn per case and axis
    slice_spacing_mm: tuple[float, float] = (3.0, 4.0)  # coronal slice spacing (A/P), thick as in clinics
    sub_slices: int = 3  # partial volume: sub-slices averaged per slice (1 = none)
    blur_mm: float = 0.4  # in-plane Gaussian point-spread sigma
    snr: tuple[float, float] = (8.0, 20.0)  # fatty-marrow signal / noise sigma, per case (Rician)
    bias_strength: float = 0.2  # std of the log of the smooth multiplicative bias field
    texture: float = 0.05  # std of the fine multiplicative texture (marrow heterogeneity)
    intensity_scale: tuple[float, float] = (600.0, 2400.0)  # stored value of fatty marrow, per scan
    non_ras_fraction: float = 1 / 3  # scans stored in a non-RAS orientation (LPS, LSP or RIA)
    rotation_deg: float = 3.0  # max |rotation| about each axis
    position_sd_mm: tuple[float, float, float] = (15.0, 4.0, 15.0)  # SD of the patient's position in the FOV
    translation_mm: tuple[float, float, float] = (40.0, 10.0, 40.0)  # max |shift| R/L, A/P, S/I (clips the above)
    off_centre_fraction: float = 0.1  # cases with the hips a further 15-25 mm to one side (some crop the head)
    body_scale: tuple[float, float] = (0.85, 1.2)  # body size (soft tissue envelope), per patient
    head_radius_mm: tuple[float, float] = (20.0, 26.0)  # femoral head radius (the longest semi-axis), per hip
    head_ellipticity: tuple[float, float] = (0.88, 1.0)  # the other semi-axes / the longest, per hip
    collapse_fraction: float = 0.2  # a lesion of at least this fraction of the head flattens its dome
    collapse_depth_mm: tuple[float, float] = (1.5, 4.0)  # how far the collapsed dome sinks
    neck_shaft_angle_deg: tuple[float, float] = (125.0, 135.0)  # per hip
    p_bilateral: float = 0.35  # patients with necrosis in both hips
    p_unilateral: float = 0.45  # patients with necrosis in one hip (the rest are healthy)
    lesion_fraction: tuple[float, float] = (0.03, 0.35)  # lesion volume / femoral head volume
    lesion_contrast: tuple[float, float] = (0.35, 0.85)  # lesion interior / marrow intensity
    lesion_irregularity: float = 0.35  # random-field amplitude relative to the lesion radius
    rim_darkness: tuple[float, float] = (0.15, 0.5)  # rim / marrow intensity (lower = more visible)
    rim_thickness_mm: tuple[float, float] = (1.0, 2.5)  # thickness of the dark demarcating rim
    p_no_rim: float = 0.25  # lesions without a demarcating rim (the rim as dark as the interior)
    mimic_mean: float = 1.5  # mean (Poisson) number of in-head mimics per hip: oedema, cysts, bone islands
    fovea_visible: float = 0.7  # hips whose fovea capitis shows as a dark notch on the medial head
    oedema_with_lesion: float = 0.5  # extra chance of marrow oedema in a hip with necrosis
    label_noise: bool = False  # 1-voxel jitter of necrosis boundaries, some small lesions unlabelled
    distractor_mean: float = 4.0  # mean of the Poisson number of distractors per patient
    distractor_likeness: float = 0.6  # probability that a marrow distractor copies the lesion look
    distractor_radius_mm: tuple[float, float] = (3.0, 10.0)  # distractor size
    followup_fraction: float = 0.0  # patients with a second scan (same anatomy, new acquisition)

    def __post_init__(self) -> None:
        for f in fields(self):  # accept lists (e.g. from JSON) for the tuple fields
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        for name, top in _RANGE_LIMITS.items():
            v = getattr(self, name)
            ok = _numbers(v, 2) and 0 < v[0] <= v[1] <= top
            _require(ok, name, v, f"a (lo, hi) pair with 0 < lo <= hi <= {top}")
        for name, top in _SCALAR_LIMITS.items():
            v = getattr(self, name)
            _require(_numbers((v,), 1) and 0 <= v <= top, name, v, f"in [0, {top}]")
        if self.p_bilateral + self.p_unilateral > 1:
            raise ValueError(
                "PhantomConfig.p_bilateral + p_unilateral must be <= 1, got "
                f"p_bilateral={self.p_bilateral!r} + p_unilateral={self.p_unilateral!r}"
            )
        fov, shift, sub = self.fov_mm, self.translation_mm, self.sub_slices
        _require(_numbers(fov, 2) and min(fov) > 0, "fov_mm", fov, "two sizes > 0 (R/L, S/I)")
        _require(_numbers(shift, 3) and min(shift) >= 0, "translation_mm", shift, "three shifts >= 0")
        sd = self.position_sd_mm
        _require(_numbers(sd, 3) and min(sd) >= 0, "position_sd_mm", sd, "three SDs >= 0")
        _require(isinstance(self.label_noise, bool), "label_noise", self.label_noise, "True or False")
        _require(
            isinstance(sub, int) and not isinstance(sub, bool) and 1 <= sub <= 16,
            "sub_slices",
            sub,
            "an int in [1, 16]",
        )

    @classmethod
    def tiny(cls, **overrides: object) -> PhantomConfig:
        """A coarse config (2-2.4 mm in-plane, 4-5 mm slices) that makes a case in well under 0.1 s."""
        base = {"inplane_spacing_mm": (2.0, 2.4), "slice_spacing_mm": (4.0, 5.0), "sub_slices": 2}
        return cls(**{**base, **overrides})


# (lo, hi) fields and the largest hi; scalar fields and their largest value
_RANGE_LIMITS = {
    "ap_coverage_mm": 400,
    "inplane_spacing_mm": 10,
    "slice_spacing_mm": 20,
    "snr": 1e4,
    "intensity_scale": 2e4,
    "head_radius_mm": 35,
    "neck_shaft_angle_deg": 170,
    "lesion_fraction": 0.9,
    "lesion_contrast": 1,
    "rim_darkness": 1,
    "rim_thickness_mm": 10,
    "distractor_radius_mm": 30,
    "body_scale": 2,
    "head_ellipticity": 1,
    "collapse_depth_mm": 10,
}
_SCALAR_LIMITS = {
    "p_bilateral": 1,
    "p_unilateral": 1,
    "non_ras_fraction": 1,
    "distractor_likeness": 1,
    "followup_fraction": 1,
    "blur_mm": 10,
    "bias_strength": 2,
    "texture": 1,
    "lesion_irregularity": 2,
    "distractor_mean": 100,
    "rotation_deg": 30,
    "off_centre_fraction": 1,
    "collapse_fraction": 1,
    "p_no_rim": 1,
    "mimic_mean": 20,
    "fovea_visible": 1,
    "oedema_with_lesion": 1,
}


def _numbers(value: object, n: int) -> bool:
    """Whether ``value`` is a tuple of ``n`` finite real numbers."""
    return (
        isinstance(value, tuple)
        and len(value) == n
        and all(
            isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"PhantomConfig.{name} must be {expected}, got {name}={value!r}")


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic scan; arrays and affine are in the stored (possibly non-RAS) orientation."""

    case_id: str  # f"AVN_{index:03d}", follow-ups f"AVN_{index:03d}_fu"
    patient_id: str  # f"P{index:03d}"
    image: np.ndarray  # int16 (X, Y, Z) stored orientation
    label: np.ndarray  # uint8, same shape: 0 background, 1 femoral head, 2 necrosis
    affine: np.ndarray  # 4x4 float64 voxel-to-world of the stored arrays
    info: dict  # JSON-serialisable generation parameters (necrosis, snr, axcodes, ...)


# ---------------------------------------------------------------- shapes (signed distances in mm)
# q is a tuple of three float32 arrays (patient coordinates); every parameter is float32 so that
# NumPy 2 never promotes the per-voxel arithmetic to float64.


class _Sphere:
    def __init__(self, c: np.ndarray, r: float) -> None:
        self.c, self.r = _F(c), _F(r)
        self.bound = (self.c, np.full(3, float(r)))  # (centre, half-extents): a box in the patient frame

    def sd(self, q: tuple) -> np.ndarray:
        return np.sqrt((q[0] - self.c[0]) ** 2 + (q[1] - self.c[1]) ** 2 + (q[2] - self.c[2]) ** 2) - self.r


class _Capsule:
    def __init__(self, a: np.ndarray, b: np.ndarray, r: float) -> None:
        self.a, self.ba, self.r = _F(a), _F(np.subtract(b, a)), _F(r)
        self.bound = (_F(np.add(a, b) / 2), np.abs(self.ba) / 2 + r)

    def sd(self, q: tuple) -> np.ndarray:
        p = [q[i] - self.a[i] for i in range(3)]
        h = sum(p[i] * self.ba[i] for i in range(3)) / _F(self.ba @ self.ba)
        np.clip(h, 0, 1, out=h)
        return np.sqrt(sum((p[i] - self.ba[i] * h) ** 2 for i in range(3))) - self.r


class _Ellipsoid:
    """Approximate signed distance (k0 (k0 - 1) / k1, exact on the surface); ``rot`` columns = axes."""

    def __init__(self, c: np.ndarray, radii: np.ndarray, rot: np.ndarray | None = None) -> None:
        self.c, self.radii, self.rot = _F(c), _F(radii), _F(np.eye(3) if rot is None else rot)
        self.bound = (self.c, np.abs(self.rot) @ self.radii)
        self.axes = [j for j in range(3) if radii[j] < 1e3]  # a radius >= 1 m makes a cylinder
        self.aligned = np.array_equal(self.rot, np.eye(3))

    def sd(self, q: tuple) -> np.ndarray:
        if self.aligned:
            loc = {j: q[j] - self.c[j] for j in self.axes}
        else:
            p = [q[i] - self.c[i] for i in range(3)]
            loc = {j: sum(p[i] * self.rot[i, j] for i in range(3)) for j in self.axes}
        k0 = np.sqrt(sum((loc[j] / self.radii[j]) ** 2 for j in self.axes))
        k1 = np.sqrt(sum((loc[j] / self.radii[j] ** 2) ** 2 for j in self.axes)) + _F(1e-6)
        return k0 * (k0 - 1) / k1


class _HalfSpace:
    def __init__(self, n: np.ndarray, p: np.ndarray, thickness: float | None = None) -> None:
        self.n, self.d, self.h = _F(n), _F(np.dot(n, p)), thickness  # slab of half-width h if given
        self.bound = None

    def sd(self, q: tuple) -> np.ndarray:
        s = q[0] * self.n[0] + q[1] * self.n[1] + q[2] * self.n[2] - self.d
        return s if self.h is None else np.abs(s) - _F(self.h)


class _Blob:
    """Ellipsoidal distance from ``c`` (mm) plus a smooth random field: ``|M (q - c)| + amp n(q) - tau``."""

    def __init__(self, rng: np.random.Generator, c: np.ndarray, flat: float, amp: float) -> None:
        rot = _random_rotation(rng)
        axes = np.array([flat, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
        self.c, self.m, self.amp, self.tau = _F(c), _F(np.diag(1 / axes) @ rot.T), _F(amp), _F(0)
        waves = rng.normal(size=(6, 3))
        waves *= (2 * np.pi / rng.uniform(10, 25, size=(6, 1))) / np.linalg.norm(waves, axis=1, keepdims=True)
        self.waves, self.phases, self.bound = _F(waves), _F(rng.uniform(0, 2 * np.pi, 6)), None

    def with_level(self, tau: float, bound: tuple | None = None) -> _Blob:
        self.tau = _F(tau)  # set once, right after construction
        self.bound = bound or (self.c, np.full(3, float((tau + 3.5 * self.amp) / self.m_min)))
        return self

    @property
    def m_min(self) -> float:
        return float(np.linalg.svd(self.m, compute_uv=False).min())

    def sd(self, q: tuple) -> np.ndarray:
        p = [q[i] - self.c[i] for i in range(3)]
        g = np.sqrt(sum(sum(self.m[j, i] * p[i] for i in range(3)) ** 2 for j in range(3)))
        waves = zip(self.waves, self.phases, strict=True)
        field = sum(np.cos(sum(k[i] * q[i] for i in range(3)) + ph) for k, ph in waves)
        return g + field * _F(self.amp * math.sqrt(2 / len(self.phases))) - self.tau


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _euler(angles_deg: np.ndarray) -> np.ndarray:
    a, b, c = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- layers and rendering


@dataclass(frozen=True)
class _Layer:
    """The intersection of ``terms`` (shape, offset mm, outside?) painted with ``bands``.

    A band (offset, value) shrinks the first term by ``offset`` mm: cortex then marrow, rim then interior.
    """

    terms: tuple
    bands: tuple[tuple[float, float], ...]


def _layer(shape: object, *bands: tuple[float, float], clip: tuple = ()) -> _Layer:
    return _Layer(((shape, 0.0, False), *clip), tuple(bands))


@dataclass(frozen=True)
class _Grid:
    origin: np.ndarray  # (3,) position of voxel 0 (FOV frame, mm)
    spacing: np.ndarray  # (3,) mm
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class _Pose:
    rot: np.ndarray  # patient -> FOV frame: p = rot q + shift
    shift: np.ndarray


def _region(grid: _Grid, pose: _Pose, terms: tuple, margin: float = 0.0) -> tuple[tuple, tuple] | None:
    """The voxel box where a region (grown by ``margin`` mm) can be, and the patient coordinates there."""
    lo, hi = np.zeros(3, int), np.array(grid.shape)
    for shape, _, outside in terms:
        if shape.bound is not None and not outside:
            c, half = shape.bound
            w, half = pose.rot @ c + pose.shift, np.abs(pose.rot) @ half + margin
            lo = np.maximum(np.floor((w - half - grid.origin) / grid.spacing).astype(int), lo)
            hi = np.minimum(np.ceil((w + half - grid.origin) / grid.spacing).astype(int) + 1, hi)
    if np.any(hi <= lo):
        return None
    ax = [_F(grid.origin[a] + grid.spacing[a] * np.arange(lo[a], hi[a]) - pose.shift[a]) for a in range(3)]
    x, y, z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
    rt = _F(pose.rot.T)
    q = tuple(rt[i, 0] * x + rt[i, 1] * y + rt[i, 2] * z for i in range(3))
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), q


def _paint(canvas: np.ndarray, grid: _Grid, pose: _Pose, layers: list[_Layer]) -> None:
    aa = _F(grid.spacing[0])  # anti-aliasing width
    for layer in layers:
        region = _region(grid, pose, layer.terms, max(0.0, -min(o for o, _ in layer.bands)) + float(aa))
        if region is None:
            continue
        box, q = region
        first, rest = _terms_sd(layer.terms, q)
        view = canvas[box]
        for offset, value in layer.bands:
            alpha = first + _F(offset) if rest is None else np.maximum(first + _F(offset), rest)
            alpha *= -1 / aa
            alpha += _F(0.5)
            np.clip(alpha, 0, 1, out=alpha)  # anti-aliased coverage of the voxel
            step = _F(value) - view
            step *= alpha
            view += step


def _terms_sd(terms: tuple, q: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    sds = [(-s.sd(q) if outside else s.sd(q)) + _F(off) for s, off, outside in terms]
    return sds[0], (np.maximum.reduce(sds[1:]) if len(sds) > 1 else None)


def _labels(grid: _Grid, pose: _Pose, regions: list[tuple[tuple, int]]) -> np.ndarray:
    label = np.zeros(grid.shape, np.uint8)
    for terms, value in regions:
        region = _region(grid, pose, terms)
        if region is not None:
            first, rest = _terms_sd(terms, region[1])
            inside = first < 0 if rest is None else (first < 0) & (rest < 0)
            label[region[0]][inside] = value
    return label


# ---------------------------------------------------------------- anatomy, lesions, distractors


@dataclass(frozen=True)
class _Anatomy:
    background: list[_Layer]  # large smooth soft tissue, painted once per slice
    layers: list[_Layer]  # bones, joints, lesions, distractors, painted on every sub-slice
    labels: list[tuple[tuple, int]]  # regions painted into the label volume, in order
    info: dict


def _v(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def _unit(v: np.ndarray | list) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _hip(rng: np.random.Generator, cfg: PhantomConfig, s: int, d: float) -> dict:
    """The shapes of one hip; ``s`` is +1 for the right hip (at +x), -1 for the left."""
    r = rng.uniform(*cfg.head_radius_mm)
    c = np.array([s * d, 0.0, 0.0])
    alpha = math.radians(180 - rng.uniform(*cfg.neck_shaft_angle_deg))  # neck axis vs shaft axis
    av = math.radians(rng.uniform(5, 20))  # anteversion
    v = np.array([-s * math.sin(alpha) * math.cos(av), math.sin(alpha) * math.sin(av), math.cos(alpha)])
    j = c - rng.uniform(2.0, 2.3) * r * v  # neck-shaft junction
    tilt = math.radians(rng.uniform(5, 10))  # the shaft runs medially downwards
    opening = _unit(np.array([s, 0.3, -0.9]) + rng.normal(0, 0.1, 3))  # acetabular opening direction
    g = rng.uniform(0.9, 1.1)  # trochanter size
    axes = np.array([1.0, *rng.uniform(*cfg.head_ellipticity, 2)]) * r  # longest semi-axis r
    head = _Ellipsoid(c, axes[rng.permutation(3)], _euler(rng.uniform(-15, 15, 3)))
    return {
        "r": r,
        "c": c,
        "v": v,
        "head": head,
        "collapse": (),  # clip terms of a flattened (collapsed) dome, set by _collapse
        "neck": _Capsule(c, j, 0.62 * r),
        "gt": _Ellipsoid(j + g * np.array([s * 10, -8, 18]), g * np.array([13, 16, 22])),
        "lt": _Ellipsoid(j + _v(-s * 12, -10, -38), [7, 8, 10]),
        "meta": _Ellipsoid(j + _v(0, -2, -8), [21, 17, 28]),
        "shaft": _Capsule(j + _v(0, 0, -5), j + 220 * _v(-s * math.sin(tilt), 0, -math.cos(tilt)), 14),
        "cup": _Sphere(c, r + 13),
        "opening": _HalfSpace(opening, c + opening * 0.15 * r),
        "ilium": _Capsule(c + _v(-s * 5, -5, r + 6), c + _v(s * 25, -20, 125), 14),
        "ischium": _Capsule(c + _v(-s * 8, -15, -18), c + _v(-s * 18, -30, -70), 13),
        "pubis": _Capsule(c + _v(-s * 20, 12, -10), [s * 8, 30, -40], 10),
        "physis": _HalfSpace(v, c - v * 0.35 * r, thickness=0.6),
    }


def _head(hip: dict, offset: float = 0.0) -> tuple:
    """The femoral head as region terms, shrunk by ``offset`` mm: the ellipsoid, cut where it collapsed."""
    return ((hip["head"], offset, False), *((plane, offset, False) for plane in hip["collapse"]))


def _collapse(rng: np.random.Generator, cfg: PhantomConfig, hip: dict, s: int) -> dict:
    """Flatten the weight-bearing dome (advanced necrosis): two tilted planes cut it, a faceted outline."""
    depth = rng.uniform(*cfg.collapse_depth_mm)
    planes = []
    for tilt in (rng.uniform(0.1, 0.4), -rng.uniform(0.1, 0.4)):
        n = _unit([s * tilt, rng.uniform(0.0, 0.3), 1.0])
        planes.append(_HalfSpace(n, hip["c"] + n * (hip["r"] - depth * rng.uniform(0.7, 1.3))))
    hip["collapse"] = tuple(planes)
    return {"depth_mm": float(depth)}


# host shape -> (cortex thickness mm, marrow T1 value); painted in this order (the head last)
_FEMUR = {
    "shaft": (4.5, _MARROW["shaft"]),
    "meta": (1.5, _MARROW["meta"]),
    "lt": (1.5, _MARROW["lt"]),
    "gt": (1.5, _MARROW["gt"]),
    "neck": (1.8, _MARROW["neck"]),
    "head": (1.2, _MARROW["head"]),
}
_PELVIS = {
    "cup": (2.0, _PELVIC_MARROW),
    "ilium": (2.0, _PELVIC_MARROW),
    "ischium": (2.0, _PELVIC_MARROW),
    "pubis": (2.0, _PELVIC_MARROW),
}
_HOSTS = {**_FEMUR, **_PELVIS}


def _bones(hips: list[dict]) -> list[_Layer]:
    """Cortex of all bones, then marrow, so overlapping parts of a bone merge without inner cortex."""

    def clip(hip: dict, name: str, off: float) -> tuple:
        return ((hip["opening"], off, False),) if name == "cup" else ()

    pelvis = [_layer(h[n], (0, _CORTEX), clip=clip(h, n, 0)) for h in hips for n in _PELVIS]
    pelvis += [_layer(h[n], (t, v), clip=clip(h, n, t)) for h in hips for n, (t, v) in _PELVIS.items()]
    joints = [_layer(_Sphere(h["c"], h["r"] + 4.5), (0, _CORTEX), clip=clip(h, "cup", 0)) for h in hips]
    joints += [_layer(_Sphere(h["c"], h["r"] + 2.2), (0, _CARTILAGE)) for h in hips]

    def cut(hip: dict, name: str, off: float) -> tuple:  # a collapsed head is flat where it sank
        return tuple((plane, off, False) for plane in hip["collapse"]) if name == "head" else ()

    femur = [_layer(h[n], (0, _CORTEX), clip=cut(h, n, 0)) for h in hips for n in _FEMUR]
    femur += [_layer(h[n], (t, v), clip=cut(h, n, t)) for h in hips for n, (t, v) in _FEMUR.items()]
    plates = [_Layer(((_HalfSpace(p.n, p.n * p.d, thickness=1.2), 0.0, False), *_head(h)), ((0, _CORTEX),))
              for h in hips for p in h["collapse"]]  # fmt: skip
    scars = [_layer(h["physis"], (0, 0.55), clip=_head(h, 1.2)) for h in hips]
    return pelvis + joints + femur + plates + scars


def _soft_tissue(rng: np.random.Generator, d: float, scale: float) -> list[_Layer]:
    body = _Ellipsoid([0, -10, 0], [scale * rng.uniform(165, 190), scale * rng.uniform(115, 135), 1e4])
    pelvic_fat = _Ellipsoid([0, -5, 75], [d - 25, 55, 55])
    bowel = [
        _Ellipsoid(
            [rng.uniform(-40, 40), rng.uniform(-40, 40), rng.uniform(40, 110)],
            rng.uniform(12, 28, 3),
            _random_rotation(rng),
        )
        for _ in range(rng.integers(5, 10))
    ]
    bladder = _Ellipsoid([0, 35, 0], rng.uniform(0.6, 1.1) * np.array([40, 35, 30]))
    crotch = _Ellipsoid([0, 0, -rng.uniform(95, 115) - 150], [30, 1e4, 150])
    return [
        _layer(body, (0, _FAT), (scale * rng.uniform(8, 30), _MUSCLE)),
        _layer(pelvic_fat, (0, 0.8 * _FAT)),
        *[_layer(b, (0, rng.uniform(0.3, 0.55))) for b in bowel],
        _layer(bladder, (0, 0.12)),
        _layer(crotch, (-12, _FAT), (0, 0.0)),
    ]


def _lesion(rng: np.random.Generator, cfg: PhantomConfig, hip: dict, s: int, frac: float) -> tuple[_Layer, tuple, dict]:
    """An antero-superior lesion whose volume is exactly ``frac`` of the head (on a 1 mm grid)."""
    r, c = hip["r"], hip["c"]
    centre = c + _unit([s * rng.uniform(0, 0.5), rng.uniform(0.3, 0.9), 1.0]) * r * rng.uniform(0.45, 0.8)
    blob = _Blob(rng, centre, rng.uniform(0.6, 0.9), cfg.lesion_irregularity * r * frac ** (1 / 3))
    o = np.arange(-math.ceil(r), math.ceil(r) + 1, dtype=_F)
    grid = np.stack(np.meshgrid(o, o, o, indexing="ij")).reshape(3, -1) + _F(c)[:, None]
    points = tuple(grid[i] for i in range(3))
    inside = np.maximum.reduce([shape.sd(points) + _F(off) for shape, off, _ in _head(hip)]) < 0
    g = blob.sd(tuple(p[inside] for p in points))  # 1 mm grid points inside the (possibly collapsed) head
    blob.with_level(float(np.quantile(g, frac)), bound=hip["head"].bound)
    contrast = rng.uniform(*cfg.lesion_contrast)
    no_rim = bool(rng.random() < cfg.p_no_rim)
    rim = contrast if no_rim else min(rng.uniform(*cfg.rim_darkness), contrast)  # never brighter than inside
    rim_mm, base = rng.uniform(*cfg.rim_thickness_mm), _MARROW["head"]
    bands = ((0, rim * base), (rim_mm, contrast * base))
    layer = _Layer(((blob, 0.0, False), *_head(hip, 1.2)), bands)
    info = {"fraction": float(frac), "contrast": float(contrast), "rim": float(rim), "rim_mm": float(rim_mm),
            "no_rim": no_rim}  # fmt: skip
    return layer, ((blob, 0.0, False), *_head(hip)), info


def _mimic(rng: np.random.Generator, hip: dict, s: int, kind: str) -> tuple[list[_Layer], dict]:
    """Something in the femoral head (or neck) that looks like necrosis on T1 but is not: no label 2.

    * ``oedema``: bone-marrow oedema, diffuse low signal over head and neck, soft-edged, no rim (it
      accompanies necrosis or transient osteoporosis; on T1 it is darker marrow, not a demarcated zone);
    * ``cyst``: a subchondral cyst, small, round, darker than a lesion, sharp, no rim, under the joint;
    * ``bone_island``: an enostosis, dense bone as dark as cortex, round or oval, sharp, anywhere;
    * ``fovea``: the fovea capitis, the ligament's pit, a dark notch at the medial head surface.
    """
    r, c, v, base = hip["r"], hip["c"], hip["v"], _MARROW["head"]
    if kind == "oedema":  # from the head towards the neck: the head's marrow and the neck's
        centre = c - v * r * rng.uniform(0.3, 0.9)
        blob = _Blob(rng, centre, rng.uniform(0.6, 0.9), 0.15 * r).with_level(r * rng.uniform(0.6, 1.0))
        value = rng.uniform(0.6, 0.85)
        bands = tuple((k * 2.5, base * (1 - (1 - value) * (k + 1) / 3)) for k in range(3))  # soft edge
        neck_bands = tuple((o, b * _MARROW["neck"] / base) for o, b in bands)
        in_neck = ((blob, 0.0, False), (hip["neck"], 1.8, False), (hip["head"], 0.0, True))
        layers = [_Layer(((blob, 0.0, False), *_head(hip, 1.2)), bands), _Layer(in_neck, neck_bands)]
        return layers, {"centre": centre, "value": float(value), "region": "head+neck"}
    if kind == "cyst":
        rho = rng.uniform(1.5, 4.0)
        direction = _unit([s * rng.uniform(-0.3, 0.6), rng.uniform(-0.3, 0.6), 1.0])
        centre = c + direction * max(0.0, r * 0.85 - rho - 1.5)  # just under the weight-bearing surface
        value = rng.uniform(0.12, 0.3)
        return [_Layer(((_Sphere(centre, rho), 0.0, False), *_head(hip, 1.2)), ((0, value * base),))], {
            "centre": centre, "value": float(value), "radius_mm": float(rho), "region": "head"}  # fmt: skip
    if kind == "bone_island":
        rho = rng.uniform(2.0, 6.0)
        centre = c + _unit(rng.normal(size=3)) * r * rng.uniform(0.0, 0.6)
        shape = _Ellipsoid(centre, rho * np.array([1.0, *rng.uniform(0.6, 1.0, 2)]), _random_rotation(rng))
        value = rng.uniform(0.04, 0.15)
        return [_Layer(((shape, 0.0, False), *_head(hip, 1.2)), ((0, value * base),))], {
            "centre": centre, "value": float(value), "radius_mm": float(rho), "region": "head"}  # fmt: skip
    # fovea capitis: medial and a little inferior, on the surface; the notch is the part inside the head
    direction = _unit([-s, rng.uniform(-0.2, 0.2), -rng.uniform(0.2, 0.5)])
    surface = c + direction * r * 0.95
    pit = _Ellipsoid(surface, rng.uniform(3.0, 5.0) * np.array([1.0, 1.5, 1.5]), np.eye(3))
    value = rng.uniform(0.15, 0.4)
    centre = c + direction * r * 0.85  # inside the head, in the notch
    return [_Layer(((pit, 0.0, False), *_head(hip, 0.0)), ((0, value * base),))], {
        "centre": centre, "value": float(value), "region": "head"}  # fmt: skip


_MIMICS = {"oedema": 0.3, "cyst": 0.4, "bone_island": 0.3}  # drawn per hip; the fovea is drawn apart


def _mimics(rng: np.random.Generator, cfg: PhantomConfig, hips: dict, sides: dict, necrotic: set) -> tuple:
    """Layers and records of every hip's mimics (their own random stream: the rest of a case stays put)."""
    layers, records = [], []
    names, weights = list(_MIMICS), np.array(list(_MIMICS.values()))
    for side, s in sides.items():
        kinds = [names[rng.choice(len(names), p=weights / weights.sum())] for _ in range(rng.poisson(cfg.mimic_mean))]
        if side in necrotic and rng.random() < cfg.oedema_with_lesion:
            kinds.append("oedema")
        if rng.random() < cfg.fovea_visible:
            kinds.append("fovea")
        for kind in kinds:
            mine, record = _mimic(rng, hips[side], s, kind)
            layers += mine
            records.append({"type": kind, "side": side, **record})
    return layers, records


def _inside_point(rng: np.random.Generator, host: object, t_range: tuple[float, float]) -> np.ndarray:
    ball = _unit(rng.normal(size=3)) * rng.random() ** (1 / 3)
    if isinstance(host, _Ellipsoid):
        return host.c + host.rot @ (host.radii * ball * 0.6)
    return host.a + rng.uniform(*t_range) * host.ba + ball * host.r * 0.5  # a capsule


def _distractor(rng: np.random.Generator, cfg: PhantomConfig, hip: dict, s: int, site: str) -> tuple[_Layer, bool]:
    """One dark spot outside the femoral head; returns the layer and whether it copies the lesion look."""
    rho = rng.uniform(*cfg.distractor_radius_mm)
    away = (hip["head"], 1.5, True)  # at least 1.5 mm outside the head sphere
    if site == "vessel":  # flow void: a dark tube near the femoral vessels, anterior to the joint
        r = hip["r"]
        p = hip["c"] + _v(-s * rng.uniform(5, 30), rng.uniform(r + 4, r + 25), rng.uniform(-40, 30))
        half = _unit(rng.normal(size=3) + _v(0, 0, 1.5)) * rng.uniform(10, 40)
        tube = _Capsule(p - half, p + half, rng.uniform(1.5, 4))
        return _Layer(((tube, 0, False), away), ((0, 0.08),)), False
    if site == "fluid":  # a bursa lateral to the greater trochanter or anterior to the joint (iliopsoas)
        gt, r = hip["gt"], hip["r"]
        lateral = gt.c + _v(s * (gt.radii[0] + 0.7 * rho), rng.uniform(-5, 5), rng.uniform(-10, 10))
        front = hip["c"] + _v(-s * rng.uniform(0, 10), r + 6 + 0.7 * rho, rng.uniform(-15, 10))
        p = lateral if rng.random() < 0.5 else front
        blob = _Blob(rng, p, rng.uniform(0.5, 0.9), 0.5 * cfg.lesion_irregularity * rho).with_level(rho)
        return _Layer(((blob, 0, False), away), ((0, rng.uniform(0.12, 0.3)),)), False
    name = {
        "trochanter": "gt",
        "neck": "neck",
        "metaphysis": "meta",
        "supra_acetabular": "ilium",
        "ischium_pubis": ("ischium", "pubis")[rng.integers(2)],
    }[site]
    t_range = {"neck": (0.5, 0.95), "ilium": (0.0, 0.4)}.get(name, (0.1, 0.8))
    blob = _Blob(
        rng, _inside_point(rng, hip[name], t_range), rng.uniform(0.6, 1.0), cfg.lesion_irregularity * rho
    ).with_level(rho)
    cortex, base = _HOSTS[name]
    like = bool(rng.random() < cfg.distractor_likeness)
    if like:
        contrast = rng.uniform(*cfg.lesion_contrast)
        rim = min(rng.uniform(*cfg.rim_darkness), contrast)
        bands = ((0, rim * base), (rng.uniform(*cfg.rim_thickness_mm), contrast * base))
    else:
        bands = ((0, rng.uniform(0.25, 0.55) * base),)
    return _Layer(((blob, 0, False), (hip[name], cortex, False), away), bands), like


def _anatomy(rng: np.random.Generator, cfg: PhantomConfig, mimic_rng: np.random.Generator) -> _Anatomy:
    has_followup = bool(rng.random() < cfg.followup_fraction)  # first draw: see _has_followup
    scale = rng.uniform(*cfg.body_scale)
    d = rng.uniform(76, 86) * scale**0.3  # half the distance between the head centres grows a little with size
    sides = {"right": 1, "left": -1}
    hips = {side: _hip(rng, cfg, s, d) for side, s in sides.items()}
    u = rng.random()
    necrotic = (
        {"right", "left"}
        if u < cfg.p_bilateral
        else {("right", "left")[rng.integers(2)]}
        if u < cfg.p_bilateral + cfg.p_unilateral
        else set()
    )
    fractions = {side: rng.uniform(*cfg.lesion_fraction) for side in sides if side in necrotic}
    collapse = {side: _collapse(rng, cfg, hips[side], sides[side]) for side, f in fractions.items()
                if f >= cfg.collapse_fraction}  # fmt: skip
    background, layers = _soft_tissue(rng, d, scale), _bones(list(hips.values()))
    mimic_layers, mimics = _mimics(mimic_rng, cfg, hips, sides, necrotic)
    layers += mimic_layers  # before the lesions: a lesion paints over the oedema it lies in
    labels: list[tuple[tuple, int]] = [(_head(h), 1) for h in hips.values()]
    lesions: dict[str, dict | None] = {}
    for side, s in sides.items():
        lesions[side] = None
        if side in necrotic:
            layer, region, lesions[side] = _lesion(rng, cfg, hips[side], s, fractions[side])
            layers.append(layer)
            labels.append((region, 2))
    names, weights = list(_SITES), np.array(list(_SITES.values()))
    distractors = []
    for _ in range(rng.poisson(cfg.distractor_mean)):
        side = ("right", "left")[rng.integers(2)]
        site = names[rng.choice(len(names), p=weights / weights.sum())]
        layer, like = _distractor(rng, cfg, hips[side], sides[side], site)
        layers.append(layer)
        distractors.append({"site": site, "side": side, "lesion_like": like})
    info = {
        "necrosis": {k: k in necrotic for k in sides},
        "lesion_fraction": {k: (v["fraction"] if v else 0.0) for k, v in lesions.items()},
        "lesions": lesions,
        "collapse": {k: collapse.get(k) for k in sides},
        "head_radius_mm": [float(hips[k]["r"]) for k in sides],
        "head_semi_axes_mm": [[float(a) for a in hips[k]["head"].radii] for k in sides],
        "head_centre_mm": {k: [float(v) for v in hips[k]["c"]] for k in sides},
        "body_scale": float(scale),
        "n_distractors": len(distractors),
        "distractors": distractors,
        "mimics": mimics,  # centres in the patient frame; _acquire adds their RAS voxel index
        "has_followup": has_followup,
    }
    return _Anatomy(background, layers, labels, info)


# ---------------------------------------------------------------- acquisition


def _smooth_field(rng: np.random.Generator, shape: tuple, spacing: np.ndarray, corr_mm: float) -> np.ndarray:
    """A smooth random field of unit std: Gaussian-weighted random knots every ``corr_mm`` (separable)."""
    mats = []
    for n, sp in zip(shape, spacing, strict=True):
        x = np.arange(n) * sp
        knots = np.arange(-1, math.ceil(n * sp / corr_mm) + 2) * corr_mm
        mats.append(_F(np.exp(-0.5 * ((x[:, None] - knots[None, :]) / corr_mm) ** 2)))
    field = rng.standard_normal([m.shape[1] for m in mats], dtype=_F)
    field = np.tensordot(mats[0], field, axes=(1, 0))  # (X, ky, kz)
    field = np.matmul(mats[1][None], field)  # (X, Y, kz)
    field = field @ mats[2].T  # (X, Y, Z)
    return field / _F(field[::3, :, ::3].std() + 1e-6)


def _degrade(image: np.ndarray, rng: np.random.Generator, cfg: PhantomConfig, sp: np.ndarray, snr: float) -> np.ndarray:
    """In-plane blur, texture, bias field and Rician noise, in place where possible."""
    if cfg.blur_mm > 0:
        image = ndimage.gaussian_filter(image, (cfg.blur_mm / sp[0], 0, cfg.blur_mm / sp[2]), truncate=3.0)
    if cfg.texture > 0:
        image *= 1 + cfg.texture * _smooth_field(rng, image.shape, sp, 6.0)
    if cfg.bias_strength > 0:
        image *= np.exp(cfg.bias_strength * _smooth_field(rng, image.shape, sp, 90.0))
    real = rng.standard_normal(image.shape, dtype=_F)
    real *= 1 / snr
    real += image
    imag = rng.standard_normal(image.shape, dtype=_F)
    imag *= 1 / snr
    return np.hypot(real, imag, out=real)


def _acquire(anat: _Anatomy, rng: np.random.Generator, cfg: PhantomConfig) -> tuple:
    """Render one scan in RAS, degrade it, and store it in a possibly non-RAS orientation."""
    sp = np.array(
        [rng.uniform(*cfg.inplane_spacing_mm), rng.uniform(*cfg.slice_spacing_mm), rng.uniform(*cfg.inplane_spacing_mm)]
    )
    extent = np.array([cfg.fov_mm[0], rng.uniform(*cfg.ap_coverage_mm), cfg.fov_mm[1]])
    nx, ny, nz = shape = tuple(int(v) for v in np.maximum(np.round(extent / sp), 1))
    origin = -(np.array(shape) - 1) / 2 * sp + _v(0, 0, _FOV_Z_OFFSET)
    angles = rng.uniform(-1, 1, 3) * cfg.rotation_deg
    shift = np.clip(rng.normal(0, 1, 3) * cfg.position_sd_mm, -np.array(cfg.translation_mm), cfg.translation_mm)
    off_centre = bool(rng.random() < cfg.off_centre_fraction)
    if off_centre:  # the hips well to one side of the FOV (a centre crop may cut one head)
        shift[0] += rng.choice([-1, 1]) * rng.uniform(15, 25)
    pose, k = _Pose(_euler(angles), shift), cfg.sub_slices
    centre = _Grid(origin, sp, shape)
    canvas = np.zeros(shape, _F)  # (X, Y, Z) RAS
    _paint(canvas, centre, pose, anat.background)
    canvas = np.repeat(canvas, k, axis=1)  # (X, Y*k, Z): sub-slices for the partial volume
    sub = _Grid(origin + _v(0, (0.5 / k - 0.5) * sp[1], 0), sp / _v(1, k, 1), (nx, ny * k, nz))
    _paint(canvas, sub, pose, anat.layers)
    image = canvas.reshape(nx, ny, k, nz).mean(axis=2)
    label = _labels(centre, pose, anat.labels)
    snr, scale = rng.uniform(*cfg.snr), rng.uniform(*cfg.intensity_scale)
    image = _degrade(image, rng, cfg, sp, snr)
    image *= scale
    image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = origin + rng.uniform(-1, 1, 3) * [40, 60, 150]  # scanner table position
    non_ras, pick = rng.random() < cfg.non_ras_fraction, int(rng.integers(len(_NON_RAS)))
    noise_rng = np.random.default_rng(rng.integers(2**63))  # drawn always, last: the flag changes nothing else
    noise = _label_noise(label, noise_rng) if cfg.label_noise else {}
    codes = _NON_RAS[pick] if non_ras else "RAS"
    transform = nio.ornt_transform(_RAS, nio.axcodes2ornt(tuple(codes)))
    stored_affine = affine @ nio.inv_ornt_aff(transform, shape)
    info = {
        "snr": float(snr),
        "spacing_mm": [float(v) for v in sp],
        "shape_ras": list(shape),
        "axcodes": codes,
        "rotation_deg": [float(v) for v in angles],
        "translation_mm": [float(v) for v in shift],
        "off_centre": off_centre,
        "intensity_scale": float(scale),
        "label_noise": noise,
        "mimic_voxels_ras": [_voxel(m["centre"], centre, pose) for m in anat.info["mimics"]],
    }
    return (nio.apply_orientation(image, transform), nio.apply_orientation(label, transform), stored_affine, info)


def _voxel(point: np.ndarray, grid: _Grid, pose: _Pose) -> list[int]:
    """The RAS voxel index of a patient-frame point in the rendered grid."""
    fov = pose.rot @ np.asarray(point, dtype=np.float64) + pose.shift
    return [int(v) for v in np.round((fov - grid.origin) / grid.spacing)]


def _label_noise(label: np.ndarray, rng: np.random.Generator) -> dict:
    """Annotator noise on the necrosis label, in place: each lesion component grows or shrinks by one
    voxel (within the head), and a small one (< 100 voxels) is missed entirely with probability 0.3."""
    necrosis = label == 2
    components, n = ndimage.label(necrosis, structure=np.ones((3, 3, 3), bool))
    grown = shrunk = missed = 0
    for index in range(1, n + 1):
        mine = components == index
        if mine.sum() < 100 and rng.random() < 0.3:
            label[mine] = 1
            missed += 1
        elif rng.random() < 0.5:
            label[ndimage.binary_dilation(mine) & (label == 1)] = 2
            grown += 1
        else:
            label[mine & ~ndimage.binary_erosion(mine)] = 1
            shrunk += 1
    return {"grown": grown, "shrunk": shrunk, "missed": missed}


# ---------------------------------------------------------------- public API

_DEFAULT = PhantomConfig()


def _streams(index: int, seed: int, followup: bool) -> tuple[np.random.Generator, ...]:
    """Anatomy, scan and mimic generators: streams spawned from ``SeedSequence([seed, index])``."""
    for name, value in (("index", index), ("seed", seed)):
        if not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
    anatomy, baseline, second, mimics = np.random.SeedSequence([seed, index]).spawn(4)
    scan = second if followup else baseline
    return np.random.default_rng(anatomy), np.random.default_rng(scan), np.random.default_rng(mimics)


def synth_case(index: int, seed: int, config: PhantomConfig = _DEFAULT, *, followup: bool = False) -> PhantomCase:
    """Generate one scan of patient ``index``; the same arguments always give the same arrays.

    Args:
        index: the patient index (>= 0); the case id is ``AVN_{index:03d}``.
        seed: the cohort seed (>= 0).
        config: the phantom knobs.
        followup: render the patient's second scan (``AVN_{index:03d}_fu``): same anatomy and lesions,
            new acquisition. :func:`iter_cohort` asks for it only for patients drawn by
            ``config.followup_fraction``; here it is rendered on request.

    Returns:
        The case, arrays and affine in its stored orientation (``info["axcodes"]``).

    Raises:
        ValueError: a negative or non-integer ``index`` or ``seed``.
        TypeError: ``config`` is not a :class:`PhantomConfig`.
    """
    if not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {type(config).__name__}")
    anatomy_rng, scan_rng, mimic_rng = _streams(index, seed, followup)
    anatomy = _anatomy(anatomy_rng, config, mimic_rng)
    image, label, affine, scan = _acquire(anatomy, scan_rng, config)
    info = {**anatomy.info, **scan, "followup": followup}
    info["mimics"] = [{**m, "centre": [float(v) for v in m["centre"]], "voxel_ras": vox}
                      for m, vox in zip(info["mimics"], info.pop("mimic_voxels_ras"), strict=True)]  # fmt: skip
    case_id = f"AVN_{index:03d}" + ("_fu" if followup else "")
    return PhantomCase(case_id, f"P{index:03d}", image, label, affine, info)


def _has_followup(index: int, seed: int, config: PhantomConfig) -> bool:
    return bool(_streams(index, seed, False)[0].random() < config.followup_fraction)


def iter_cohort(cases: int, seed: int, config: PhantomConfig = _DEFAULT) -> Iterator[PhantomCase]:
    """Yield patients ``0 .. cases-1``, each followed by its follow-up scan when it has one.

    Raises:
        ValueError: ``cases < 1`` or a bad seed (at the call, not at the first ``next``).
    """
    if not isinstance(cases, int | np.integer) or cases < 1:
        raise ValueError(f"cases must be an int >= 1, got {cases=}")
    _streams(0, seed, False)  # validates the seed
    return _cohort(int(cases), seed, config)


def _cohort(cases: int, seed: int, config: PhantomConfig) -> Iterator[PhantomCase]:
    for index in range(cases):
        yield synth_case(index, seed, config)
        if _has_followup(index, seed, config):
            yield synth_case(index, seed, config, followup=True)


def is_phantom_cohort(path: Path) -> bool:
    """Whether ``path`` holds a cohort written by :func:`write_cohort` (what ``synth --overwrite`` replaces)."""
    from avn_study.outputs import json_marker

    return json_marker(Path(path) / DATASET_JSON, "phantom")


PHANTOM_CHANNELS = ("T1", "STIR")


def stir_channel(case: PhantomCase, seed: int) -> np.ndarray:
    """A STIR-like second sequence of a phantom scan, on its grid (int16).

    STIR suppresses fat: what is bright on T1 (fatty marrow of the femoral head, subcutaneous fat) is
    dark, and fluid is bright. Here: the inverted T1 within the body, plus a faint, blurred rise over
    the necrosis (the oedema of a real lesion is larger and brighter; kept faint so that the second
    channel helps without deciding the answer), plus its own noise.
    """
    import zlib

    from scipy import ndimage

    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode()), 7])  # its own stream per scan
    t1 = case.image.astype(np.float32)
    body = t1 > np.percentile(t1, 5)
    level = float(np.median(t1[body])) if body.any() else 1.0
    stir = np.where(body, np.percentile(t1, 99) - t1, 0.0) * 0.6
    lesion = ndimage.gaussian_filter((case.label == 2).astype(np.float32), 1.0)
    stir += lesion * 0.25 * level + rng.normal(0.0, 0.06 * level, t1.shape)
    return np.clip(stir, 0, np.iinfo(np.int16).max).astype(np.int16)


def write_cohort(
    out: str | Path, cases: int, seed: int, config: PhantomConfig = _DEFAULT, channels: tuple[str, ...] = ("T1",)
) -> Path:
    """Write a cohort in the nnU-Net v2 raw layout; ``dataset.json`` is written last.

    ``channels``: ``("T1",)`` or ``("T1", "STIR")`` (a second, STIR-like sequence: :func:`stir_channel`).

    Files of the same names are overwritten; a stale ``dataset.json`` is removed first, so a folder
    without one is an incomplete cohort.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``cases < 1`` or a bad seed.
    """
    out = Path(out)
    if tuple(channels) not in (PHANTOM_CHANNELS[:1], PHANTOM_CHANNELS):
        raise ValueError(f"channels must be ('T1',) or ('T1', 'STIR'), got {channels!r}")
    cohort = iter_cohort(cases, seed, config)  # validates the arguments before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)
    patients, infos = {}, {}
    for case in cohort:
        write_nifti(case.image, case.affine, out / IMAGES_TR / f"{case.case_id}_0000.nii.gz")
        if len(channels) > 1:
            write_nifti(stir_channel(case, seed), case.affine, out / IMAGES_TR / f"{case.case_id}_0001.nii.gz")
        write_nifti(case.label, case.affine, out / LABELS_TR / f"{case.case_id}.nii.gz")
        patients[case.case_id], infos[case.case_id] = case.patient_id, case.info
    dataset = {
        "name": "AVN phantom",
        "description": "Synthetic coronal T1 hip MRI with femoral head necrosis (avn_study.data.phantom)",
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": {"background": 0, "femoral_head": 1, "necrosis": 2},
        "numTraining": len(patients),
        "file_ending": ".nii.gz",
        "patients": patients,
        "phantom": {"seed": int(seed), "config": asdict(config), "cases": infos},
    }
    (out / DATASET_JSON).write_text(json.dumps(dataset, indent=2) + "\n")
    return out
