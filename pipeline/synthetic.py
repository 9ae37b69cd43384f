"""Synthetic H&E whole-slide images and a demo cohort.

A slide is a pure function of level-0 pixel coordinates, so any rectangle of any pyramid
level can be rendered on its own: `write_slide` streams a JPEG-tiled pyramidal SVS/TIFF
tile by tile (memory stays bounded for 60,000 x 60,000 px slides), and every level is
rendered from the same procedural content rather than resized from the level below.

`HETissueRenderer` draws white glass, a few irregular tissue islands, eosin-pink stroma
and hematoxylin-purple nuclei. The class of a slide shows in its tissue *structure*
(glands, solid sheets, spindle cells, pleomorphic nuclei) while each slide's stain
(H and E colours and strengths, glass tint) varies like a staining batch, so that mean
colour does not give the class away. All sizes below are in level-0 px and are designed
for 0.5 µm/px (20x); a slide written with another mpp simply has structures of the same
pixel size.

`make_demo_cohort` writes a small labelled cohort with TCGA-style file names and a
``manifest.csv``. Everything is deterministic for a seed, byte for byte.
"""

from __future__ import annotations

import math
import threading
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import tifffile

from .files import write_csv

__all__ = [
    "CLASS_NAMES",
    "HETissueRenderer",
    "SlideRenderer",
    "Stain",
    "level_downsamples",
    "make_demo_cohort",
    "write_blank_slide",
    "write_he_slide",
    "write_no_mpp_slide",
    "write_slide",
    "write_small_slide",
]

CLASS_NAMES = ("glandular", "solid", "spindle", "pleomorphic")
"""Label of tissue class 0, 1, 2, 3."""

APERIO_HEADER = "Aperio Image Library v12.0.15"

_CELL = 16  # nucleus lattice spacing = render block side, level-0 px (8 µm at 0.5 µm/px)
_MAX_STEP = 8  # coarsest sampling step, level-0 px; coarser levels average several samples
_BAND_SAMPLES = 1 << 18  # samples rendered at once: bounds the work arrays (1 MiB each)
_H_STEP, _N_H = 0.025, 96  # hematoxylin density quantisation of the colour table
_E_STEP, _N_E = 0.025, 64  # eosin density quantisation of the colour table
_MESA = 2.0  # nucleus profile A*min(1, 2*(1-q)): flat core, soft rim
# A box filter of width s (one sample) has variance s²/12; the mesa profile has variance
# 0.194*a² along a semi-axis a, so blurring by one sample adds (1/12)/0.194 s² to a².
_BLUR_PER_STEP2 = (1 / 12) / 0.194
_FIBRE_WAVELENGTH = 12.0  # px, collagen streaks
_RAGGED = 5.0  # px, amplitude (per unit of the "rim" field) of the ragged tissue edge
_THUMB_MAX = 768  # long side of the Aperio thumbnail page, px
_MIN_PYRAMID_SIDE = 1024  # levels are added until the long side is at most this, px


class SlideRenderer(Protocol):
    """Anything that `write_slide` can draw from."""

    def region(self, x: int, y: int, w: int, h: int, downsample: float = 1) -> np.ndarray:
        """RGB uint8 (h, w, 3): level-0 rectangle from (x, y), sampled every `downsample` px."""
        ...


# ----------------------------------------------------------------------------- noise


def _salt(seed: int, tag: int) -> int:
    return (seed * 0x9E3779B1 + tag * 0x85EBCA77 + 0x27D4EB2F) & 0xFFFFFFFF


def _hash2(ix: np.ndarray, iy: np.ndarray, salt: int | np.ndarray) -> np.ndarray:
    """uint32 hash of integer coordinates and salt (any broadcastable int arrays)."""
    h = (np.asarray(ix).astype(np.uint32) * np.uint32(0x8DA6B343)) ^ (
        np.asarray(iy).astype(np.uint32) * np.uint32(0xD8163841) + np.asarray(salt).astype(np.uint32)
    )
    # lowbias32 finaliser: cheap, and good enough that no lattice pattern shows
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def _uniform(ix: np.ndarray, iy: np.ndarray, salt: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 per integer coordinate."""
    return _hash2(ix, iy, salt) * (1.0 / 2**32)


def _outer_sum(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """sum_k outer(rows[:, k], cols[:, k]) for rows (m, K), cols (n, K) -> (m, n)."""
    out = np.zeros((rows.shape[0], cols.shape[0]))
    for k in range(rows.shape[1]):
        out += rows[:, k, None] * cols[None, :, k]
    return out


class _Waves:
    """Smooth random fields by name, each a sum of plane waves of random direction and of
    wavelength (px) in a given range, with unit variance. Analytic, so a point gets the
    same value whatever tile or level asks for it.

    On a grid, cos(a(x) + b(y)) = cos a cos b - sin a sin b makes a whole field a sum of
    outer products of per-column and per-row terms: no transcendental per grid point. (Not
    a matrix product: for these thin products a multithreaded BLAS mostly waits for its
    threads, 30x slower on a busy machine.)"""

    def __init__(self, rng: np.random.Generator, spec: dict[str, tuple[int, tuple[float, float]]]):
        self.fields = {}
        for name, (n, wavelengths) in spec.items():
            k = 2 * np.pi / rng.uniform(*wavelengths, n)
            angle = rng.uniform(0, 2 * np.pi, n)
            self.fields[name] = (k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, n), math.sqrt(2 / n))

    def bound(self, name: str) -> float:
        """Largest absolute value the field can take."""
        kx, _, _, amp = self.fields[name]
        return amp * len(kx)

    def __call__(self, x: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
        """The field at x (1, n) x y (m, 1), level-0 px -> (m, n)."""
        kx, ky, phase, amp = self.fields[name]
        a, b = kx * x.reshape(-1, 1) + phase, ky * y.reshape(-1, 1)  # (n, waves), (m, waves)
        return _outer_sum(amp * np.cos(b), np.cos(a)) - _outer_sum(amp * np.sin(b), np.sin(a))

    def gradient(self, x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """d/dx and d/dy (per px) of the field at x (1, n) x y (m, 1), each (m, n):
        -amp sum k sin(a + b), with sin(a + b) = sin a cos b + cos a sin b."""
        kx, ky, phase, amp = self.fields[name]
        a, b = kx * x.reshape(-1, 1) + phase, ky * y.reshape(-1, 1)
        cos_b, sin_b = -amp * np.cos(b), -amp * np.sin(b)
        sin_a, cos_a = np.sin(a), np.cos(a)
        return tuple(_outer_sum(cos_b, k * sin_a) + _outer_sum(sin_b, k * cos_a) for k in (kx, ky))


# ----------------------------------------------------------------------------- stain


@dataclass(frozen=True)
class Stain:
    """A staining batch: RGB of empty glass (0-255) and optical density (OD) per unit of
    hematoxylin and eosin density, each (3,) for R, G, B (Beer-Lambert: RGB = glass *
    exp(-OD))."""

    glass: np.ndarray
    hematoxylin: np.ndarray
    eosin: np.ndarray

    @classmethod
    def from_seed(cls, stain_seed: int) -> "Stain":
        """A random but plausible batch: hue shifts of H and E, strengths 0.6x-1.45x (H) and
        0.6x-1.5x (E), glass tint."""
        rng = np.random.default_rng([stain_seed, 0x57A1])
        h = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.06, 3)
        e = np.array([0.07, 0.99, 0.11]) + rng.normal(0, [0.05, 0.03, 0.08])
        h = np.clip(h, 0.05, None)
        e = np.clip(e, 0.02, None)
        h *= rng.uniform(0.6, 1.45) / np.linalg.norm(h)
        e *= rng.uniform(0.6, 1.5) / np.linalg.norm(e)
        glass = np.clip(rng.uniform(235, 246) + rng.uniform(-3, 3, 3), 230, 250)
        return cls(glass=glass, hematoxylin=h, eosin=e)

    def colour_table(self) -> np.ndarray:
        """uint8 (N_H * N_E, 3): RGB of hematoxylin level i and eosin level j at row i * N_E + j.

        Level i is density (i - 0.5) * H_STEP (clipped at 0) because the lookup dithers H
        over two levels, which also gives the glass its slight noise; level j is j * E_STEP.
        """
        h = np.clip((np.arange(_N_H) - 0.5) * _H_STEP, 0, None)
        e = np.arange(_N_E) * _E_STEP
        od = h[:, None, None] * self.hematoxylin + e[None, :, None] * self.eosin
        rgb = self.glass * np.exp(-od)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(_N_H * _N_E, 3)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Islands:
    """Tissue islands: blobs whose rim radius is a sum of low radial harmonics."""

    centres: np.ndarray  # (n, 2) level-0 px
    radii: np.ndarray  # (n,) level-0 px
    harmonics: np.ndarray  # (n, 4) relative rim amplitude of orders 2..5
    phases: np.ndarray  # (n, 4) rad

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Approximate signed distance to the union rim (px, > 0 inside tissue) at x (1, n) x
        y (m, 1), level-0 px -> (m, n) float64."""
        out = None
        coef = self.harmonics * np.exp(1j * self.phases)  # rim = r (1 + Re sum_m coef_m z^m)
        for (cx, cy), r, c in zip(self.centres, self.radii, coef):
            dz = (x - cx) + 1j * (y - cy)
            dist = np.abs(dz)
            z = dz / np.maximum(dist, 1e-9)  # e^(i theta), powers instead of trigonometry
            zm, wobble = z * z, 0
            for cm in c:  # orders 2, 3, ...
                wobble = wobble + cm * zm
                zm = zm * z
            sdf = r * (1 + wobble.real) - dist
            out = sdf if out is None else np.maximum(out, sdf)
        return out

    @classmethod
    def random(cls, width: int, height: int, rng: np.random.Generator) -> "_Islands":
        """2-4 islands covering 35-55 % of the slide (the size is solved for on a coarse grid)."""
        n = int(rng.integers(2, 5))
        centres = rng.uniform([0.22 * width, 0.22 * height], [0.78 * width, 0.78 * height], (n, 2))
        rel = rng.uniform(0.6, 1.0, n)
        harmonics = rng.uniform(-1, 1, (n, 4)) * (0.24 / np.arange(2, 6))
        phases = rng.uniform(0, 2 * np.pi, (n, 4))
        target = rng.uniform(0.35, 0.55)
        gx = ((np.arange(64) + 0.5) * width / 64)[None, :]
        gy = ((np.arange(48) + 0.5) * height / 48)[:, None]
        scale = 0.3 * min(width, height)
        for _ in range(8):  # coverage grows monotonically with scale: a few fixed-point steps
            cover = (cls(centres, scale * rel, harmonics, phases).sdf(gx, gy) > 0).mean()
            scale *= math.sqrt(target / max(cover, 0.01))
        return cls(centres, scale * rel, harmonics, phases)


_INKS = {  # OD of pen ink, R G B
    "blue": np.array([1.4, 0.85, 0.2]),
    "green": np.array([1.1, 0.3, 0.9]),
    "black": np.array([1.5, 1.45, 1.35]),
}


@dataclass(frozen=True)
class _Stroke:
    """A thick pen stroke along a polyline."""

    points: np.ndarray  # (k, 2) level-0 px
    half_width: float  # px
    ink: np.ndarray  # (3,) OD

    def misses(self, x: np.ndarray, y: np.ndarray, margin: float) -> bool:
        """True when the ink surely stays `margin` px away from the box spanned by x and y."""
        lo = self.points.min(axis=0) - self.half_width - margin
        hi = self.points.max(axis=0) + self.half_width + margin
        return bool(x.max() < lo[0] or x.min() > hi[0] or y.max() < lo[1] or y.min() > hi[1])

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance to the stroke edge, px (> 0 on ink)."""
        d2 = np.inf
        for (px, py), (qx, qy) in zip(self.points[:-1], self.points[1:]):
            vx, vy = qx - px, qy - py
            t = np.clip(((x - px) * vx + (y - py) * vy) / (vx * vx + vy * vy), 0, 1)
            d2 = np.minimum(d2, (x - px - t * vx) ** 2 + (y - py - t * vy) ** 2)
        return self.half_width - np.sqrt(d2)

    @classmethod
    def random_set(cls, islands: _Islands, width: int, height: int, rng: np.random.Generator) -> list["_Stroke"]:
        """One stroke per ink, each running from the glass into an island (bent quadratic curve)."""
        strokes = []
        for ink in rng.permutation(list(_INKS)):
            i = int(rng.integers(len(islands.radii)))
            (cx, cy), r = islands.centres[i], islands.radii[i]
            a = rng.uniform(0, 2 * np.pi)
            p0 = np.clip([cx + 1.5 * r * np.cos(a), cy + 1.5 * r * np.sin(a)], [0, 0], [width, height])
            b = a + rng.uniform(-0.6, 0.6)
            p2 = np.array([cx + 0.3 * r * np.cos(b), cy + 0.3 * r * np.sin(b)])
            normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]])
            p1 = (p0 + p2) / 2 + rng.uniform(-0.3, 0.3) * normal
            t = np.linspace(0, 1, 25)[:, None]
            points = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
            half = rng.uniform(0.010, 0.018) * min(width, height)
            strokes.append(cls(points, half, _INKS[str(ink)]))
        return strokes


# ----------------------------------------------------------------------------- renderer


@dataclass
class _Nuclei:
    """One candidate nucleus per lattice point; arrays (m, n), level-0 px and rad."""

    amp: np.ndarray  # peak hematoxylin density, 0 where there is no nucleus
    ox: np.ndarray  # centre offset from the lattice point
    oy: np.ndarray
    a: np.ndarray  # semi-axis along `angle`
    b: np.ndarray  # semi-axis across
    angle: np.ndarray

    def where(self, cond: np.ndarray, other: "_Nuclei") -> "_Nuclei":
        """These nuclei where `cond`, `other` elsewhere."""
        return _Nuclei(*(np.where(cond, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


class _Glands:
    """Glands at 80 % of the cells of a 112 px square lattice turned by a random angle,
    centres jittered by up to 19 px: elliptic lumens of mean radius 12-20 px and aspect up
    to 1.5, lined by a ring of nuclei 8 px outside the rim. A lumen ends at least 12 px
    inside its own cell, so the gland of a block's centre is the only one whose lumen can
    reach the block (its corners are 11.3 px away)."""

    spacing = 112.0

    def __init__(self, seed: int, angle: float):
        self.salts = np.array([_salt(seed, 100 + k) for k in range(6)], np.uint32)[:, None, None]
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """For points x (1, n) x y (m, 1) (level-0 px), the gland of their cell: offset
        (dx, dy) of the point from its centre, px, and its lumen as q = m11 dx² + 2 m12 dx dy
        + m22 dy² (q = 1 on the rim) with mean radius r; each (m, n), r = 0 where the cell
        has no gland."""
        xr, yr = x * self.cos + y * self.sin, y * self.cos - x * self.sin  # lattice frame
        ci, cj = np.floor(xr / self.spacing), np.floor(yr / self.spacing)
        u = _uniform(ci.astype(np.int64), cj.astype(np.int64), self.salts)
        dxr = xr - (ci + 0.5 + 0.34 * (u[1] - 0.5)) * self.spacing
        dyr = yr - (cj + 0.5 + 0.34 * (u[2] - 0.5)) * self.spacing
        dx, dy = dxr * self.cos - dyr * self.sin, dxr * self.sin + dyr * self.cos
        r = np.where(u[0] < 0.8, 12 + 8 * u[3], 0.0)
        aspect = np.sqrt(1 + 0.5 * u[4])
        c, s = np.cos(np.pi * u[5]), np.sin(np.pi * u[5])
        ia2 = (aspect / np.maximum(r, 1)) ** 2  # 1 / semi-axis² along the tilt
        ib2 = (1 / (aspect * np.maximum(r, 1))) ** 2  # and across
        return dx, dy, ia2 * c * c + ib2 * s * s, (ia2 - ib2) * c * s, ia2 * s * s + ib2 * c * c, r


@dataclass
class _Lattice:
    """Fields at the lattice points (block corners) of a render, (m, n) float32, bilinearly
    interpolated to the samples; nuclei and lumens are drawn as shapes instead."""

    edge: np.ndarray  # signed distance to the tissue edge in edge widths, + 0.5 (clip -> coverage)
    e_mean: np.ndarray  # eosin density
    e_fibre: np.ndarray  # eosin amplitude of the collagen streaks
    phase: np.ndarray  # streak phase, rad
    nuclei: _Nuclei
    lumens: tuple[np.ndarray, ...] | None  # `_Glands.of` the block centres
    pens: list[tuple[np.ndarray, np.ndarray]]  # (ink coverage field like `edge`, ink OD (3,))
    edge_width: float  # px


class HETissueRenderer:
    """Procedural H&E slide content of a `width` x `height` px (level-0) slide.

    `tissue_class` (0-3, see `CLASS_NAMES`) sets the tissue structure: 0 glands (rings of
    columnar nuclei around pale lumens), 1 solid sheets of small round nuclei, 2 spindle
    nuclei along wavy collagen fibres, 3 large pleomorphic nuclei. `stain_seed` picks the
    staining batch (`Stain.from_seed`), `seed` the layout (islands, nuclei, pen strokes).
    `pen_marks` adds blue, green and black ink strokes running from glass into tissue;
    `tissue=False` renders empty glass.
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        tissue_class: int,
        stain_seed: int,
        seed: int,
        pen_marks: bool = False,
        tissue: bool = True,
    ):
        if not 0 <= tissue_class < len(CLASS_NAMES):
            raise ValueError(f"tissue_class must be 0..{len(CLASS_NAMES) - 1}, got {tissue_class}")
        self.width, self.height = int(width), int(height)
        self.tissue_class = tissue_class
        self.stain = Stain.from_seed(stain_seed)
        self.seed = seed
        self.has_tissue = tissue
        self._lut = self.stain.colour_table()
        rng = np.random.default_rng([seed, 0x715E])
        self._islands = _Islands.random(self.width, self.height, rng)
        self._waves = _Waves(
            rng,
            {
                "rim": (6, (60, 200)),  # ragged tissue edge
                "eosin": (6, (300, 1200)),  # uneven eosin uptake
                "warp": (6, (150, 600)),  # bends the collagen streaks
                "contrast": (6, (80, 300)),  # streaks fade in and out
                "nests": (8, (100, 300)),  # epithelial nests vs stromal septa
            },
        )
        self._fibre_angle = rng.uniform(0, np.pi)
        gland_angle = rng.uniform(0, np.pi / 2)  # drawn for every class: same layout per seed
        self._glands = _Glands(seed, gland_angle) if tissue_class == 0 else None
        self._strokes = _Stroke.random_set(self._islands, self.width, self.height, rng) if pen_marks else []

    # -- public

    def region(self, x: int, y: int, w: int, h: int, downsample: float = 1) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 rectangle from (x, y) (level-0 px), each output
        pixel averaging a `downsample` x `downsample` px level-0 square: pixel (i, j) covers
        [x + j*d, x + (j+1)*d) x [y + i*d, y + (i+1)*d), as a pyramid level of that
        downsample stores it.

        `downsample` must be a positive integer. Content is sampled every 1, 2, 4 or 8 px
        (nuclei, streaks and edges band-limited to that step) and box-averaged beyond, so any
        level agrees with the averaged level-0 content.
        """
        d = _integer_downsample(downsample)
        x, y, w, h = int(x), int(y), int(w), int(h)
        step = _sample_step(d, x, y)
        f = d // step
        out = np.empty((h, w, 3), np.uint8)
        rows = max(1, _BAND_SAMPLES // max(1, w * f * f))
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            samples = self._samples(x, y + r0 * d, w * f, (r1 - r0) * f, step)
            out[r0:r1] = _box_mean(samples, f)
        return out

    def tissue_mask(self, x: int, y: int, w: int, h: int, downsample: float = 1) -> np.ndarray:
        """Ground truth: bool (h, w), True where the pixel centre lies on a tissue island
        (lumens count as tissue, pen ink is ignored). Same pixel grid as `region`."""
        if not self.has_tissue:
            return np.zeros((h, w), bool)
        px = (x + (np.arange(w) + 0.5) * downsample)[None, :]
        py = (y + (np.arange(h) + 0.5) * downsample)[:, None]
        return self._tissue_sdf(px, py) > 0

    # -- sampling

    def _tissue_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance to the tissue edge, px (> 0 inside), at x (1, n) x y (m, 1)."""
        return self._islands.sdf(x, y) + _RAGGED * self._waves(x, y, "rim")

    def _samples(self, x: int, y: int, ws: int, hs: int, step: int) -> np.ndarray:
        """RGB uint8 (hs, ws, 3) of samples every `step` px from (x, y), both multiples of step."""
        bx0, by0 = (x // _CELL) * _CELL, (y // _CELL) * _CELL
        nbx = -(-(x + ws * step - bx0) // _CELL)
        nby = -(-(y + hs * step - by0) // _CELL)
        img = self._render_blocks(bx0, by0, nbx, nby, step)
        ox, oy = (x - bx0) // step, (y - by0) // step
        return img[oy : oy + hs, ox : ox + ws]

    def _render_blocks(self, bx0: int, by0: int, nbx: int, nby: int, step: int) -> np.ndarray:
        """RGB uint8 (nby*L, nbx*L, 3), L = CELL/step: the nby x nbx blocks of CELL px from
        level-0 (bx0, by0), a multiple of CELL. The result lives in the work arrays: copy it
        before the next render.

        Work arrays are laid out (block row, row in block, block column, column in block), so
        per-block and per-lattice-point values broadcast over the samples without gathers.
        """
        n = _CELL // step
        shape = (nby, n, nbx, n)
        gx = (bx0 + _CELL * np.arange(nbx + 1, dtype=np.float64))[None, :]
        gy = (by0 + _CELL * np.arange(nby + 1, dtype=np.float64))[:, None]
        local = ((np.arange(n) + 0.5) * step).astype(np.float32)  # sample offsets in a block, px
        hashed = _sample_hash(bx0 // step, by0 // step, nbx, nby, n, _salt(self.seed, 1000 + step))
        rgb = _work("rgb", (*shape, 3), np.uint8)
        lat = self._lattice(gx, gy, step) if self.has_tissue else None
        if lat is None:  # glass only: the H dither below with h = e = 0 (2 * u1 >= 1 is bit 15)
            idx = _work("glass_idx", shape, np.uint32)
            np.right_shift(hashed, np.uint32(15), out=idx)
            idx &= np.uint32(1)
            idx *= np.uint32(_N_E)
            return np.take(self._lut, idx.view(np.int32), axis=0, out=rgb).reshape(nby * n, nbx * n, 3)
        u1, u2, u3 = _sample_uniforms(hashed)

        t = local / _CELL
        ty = t[None, :, None, None]

        def interp(field: np.ndarray, out: np.ndarray) -> np.ndarray:
            fx = field[:, :-1, None] + (field[:, 1:] - field[:, :-1])[:, :, None] * t  # (m, nbx, L)
            np.multiply((fx[1:] - fx[:-1])[:, None], ty, out=out)
            out += fx[:-1, None]
            return out

        tmp = _work("tmp", shape)
        mask = interp(lat.edge, _work("mask", shape))
        if lat.lumens is not None:
            np.minimum(mask, _lumen_edge(lat.lumens, local, lat.edge_width, out=tmp), out=mask)
        np.clip(mask, 0, 1, out=mask)
        e = interp(lat.phase, _work("e", shape))
        np.cos(e, out=e)
        e *= interp(lat.e_fibre, tmp)
        e += interp(lat.e_mean, tmp)
        e *= mask
        h = _draw_nuclei(lat.nuclei, local, step, out=_work("h", shape))
        np.multiply(u2, 0.6 / step, out=tmp)  # chromatin grain, averaging out at coarse steps
        tmp += 1 - 0.3 / step
        h *= tmp
        np.multiply(mask, _COUNTERSTAIN[self.tissue_class], out=tmp)  # faint hematoxylin in the stroma
        h += tmp

        # colour lookup, dithered: H over two levels (see Stain.colour_table), E over one
        h *= 1 / _H_STEP
        h += np.multiply(u1, 2, out=tmp)
        np.minimum(h, _N_H - 1, out=h)
        e *= 1 / _E_STEP
        e += u3
        np.minimum(e, _N_E - 1, out=e)
        idx, e_idx = _work("idx", shape, np.int32), _work("idx2", shape, np.int32)
        np.copyto(idx, h, casting="unsafe")  # truncation = floor for these non-negative values
        np.copyto(e_idx, e, casting="unsafe")
        idx *= _N_E
        idx += e_idx
        np.take(self._lut, idx, axis=0, out=rgb)  # much faster than fancy indexing
        if lat.pens:
            od = 0
            for field, ink in lat.pens:
                od = od + np.clip(interp(field, tmp), 0, 1)[..., None] * ink.astype(np.float32)
            rgb[...] = rgb * np.exp(-od) + 0.5
        return rgb.reshape(nby * n, nbx * n, 3)

    # -- lattice fields

    def _lattice(self, gx: np.ndarray, gy: np.ndarray, step: int) -> _Lattice | None:
        """Fields at the lattice points gx (1, n) x gy (m, 1), level-0 px; None when the whole
        area is glass."""
        edge_width = max(2.0, float(step))  # anti-aliased edge about one sample wide
        pens = []
        for stroke in self._strokes:
            if stroke.misses(gx, gy, edge_width):
                continue
            field = stroke.sdf(gx, gy) / edge_width + 0.5
            if field.max() > 0:
                pens.append((field.astype(np.float32), stroke.ink))
        islands = self._islands.sdf(gx, gy)
        if islands.max() <= -edge_width - _RAGGED * self._waves.bound("rim") and not pens:
            return None  # glass for sure, whatever the ragged rim does
        tissue = islands + _RAGGED * self._waves(gx, gy, "rim")
        if tissue.max() <= -edge_width and not pens:
            return None
        ix = np.rint(gx / _CELL).astype(np.int64)
        iy = np.rint(gy / _CELL).astype(np.int64)
        salts = np.array([_salt(self.seed, k) for k in range(8)], np.uint32)[:, None, None]
        u = _uniform(ix, iy, salts)  # (8, m, n) independent uniforms per lattice point
        present = np.clip(tissue / 8, 0, 1)  # nuclei thin out over the last 8 px of tissue
        # collagen streaks: a plane wave bent by a smooth warp; fibres run across its gradient
        k = 2 * np.pi / _FIBRE_WAVELENGTH
        c, s = math.cos(self._fibre_angle), math.sin(self._fibre_angle)
        phase = k * (gx * c + gy * s) + 12.0 * self._waves(gx, gy, "warp")
        wx, wy = self._waves.gradient(gx, gy, "warp")
        along = np.arctan2(k * s + 12.0 * wy, k * c + 12.0 * wx) + np.pi / 2
        stroma = _stromal(u, present, along, _STROMAL_NUCLEI[self.tissue_class])
        if self.tissue_class == 0:
            nuclei, nest = _gland_nuclei(u, present, stroma, self._glands.of(gx, gy)), 0.0
            lumens = tuple(v.astype(np.float32) for v in self._glands.of(gx[:, :-1] + _CELL / 2, gy[:-1] + _CELL / 2))
        else:
            nest = np.clip((self._waves(gx, gy, "nests") + _NEST_LEVEL[self.tissue_class]) / 0.25, 0, 1)
            nuclei, lumens = _CLASS_NUCLEI[self.tissue_class](u, present, along).where(u[7] < nest, stroma), None

        contrast = (0.3 if self.tissue_class == 2 else 0.15) * _fibre_attenuation(step)
        contrast = contrast * np.clip(0.55 + 0.45 * self._waves(gx, gy, "contrast"), 0, 1)
        e_mean = _EOSIN[self.tissue_class] * (1 + 0.12 * self._waves(gx, gy, "eosin")) * (1 - 0.25 * nest)
        phase = phase - 2 * np.pi * np.floor(phase.min() / (2 * np.pi))  # small values for float32
        f32 = np.float32
        return _Lattice(
            edge=(tissue / edge_width + 0.5).astype(f32),
            e_mean=e_mean.astype(f32),
            e_fibre=(contrast * e_mean * (1 - 0.7 * nest)).astype(f32),
            phase=phase.astype(f32),
            nuclei=nuclei,
            lumens=lumens,
            pens=pens,
            edge_width=edge_width,
        )


def _jitter(u: np.ndarray, j: float) -> np.ndarray:
    return (u - 0.5) * 2 * j


def _stromal(u: np.ndarray, present: np.ndarray, along: np.ndarray, p: float) -> _Nuclei:
    """Fibroblast nuclei (semi-axes 5.5-7 x 2.2 px) along the collagen at a share `p` of
    the lattice points."""
    return _Nuclei(
        amp=np.where(u[0] < p * present, 1.0 + 0.3 * u[5], 0.0),
        ox=_jitter(u[3], 4),
        oy=_jitter(u[4], 4),
        a=5.5 + 1.5 * u[1],
        b=np.full_like(u[1], 2.2),
        angle=along + 0.3 * (u[2] - 0.5),
    )


def _gland_nuclei(u: np.ndarray, present: np.ndarray, stroma: _Nuclei, gland: tuple[np.ndarray, ...]) -> _Nuclei:
    """Columnar nuclei (radial semi-axes 7.5 x 4.5-5 px) snapped onto the ring 8 px outside
    the lumen of the lattice point's gland (`_Glands.of`); stromal nuclei elsewhere, none
    inside lumens."""
    dx, dy, m11, m12, m22, r = gland
    dist = np.hypot(dx, dy) + 1e-6
    radial = np.arctan2(dy, dx)
    q = m11 * dx * dx + 2 * m12 * dx * dy + m22 * dy * dy  # 1 on the lumen rim
    rim = dist / np.sqrt(q + 1e-12)  # distance from the centre to the rim along this ray
    snap = np.where(r > 0, rim + 8 - dist, np.inf)  # radial move onto the ring, px
    epithelial = _Nuclei(
        amp=np.where(u[0] < 0.97 * present, 1.05 + 0.25 * u[5], 0.0),
        ox=np.where(np.isfinite(snap), snap, 0) * np.cos(radial) + _jitter(u[3], 1),
        oy=np.where(np.isfinite(snap), snap, 0) * np.sin(radial) + _jitter(u[4], 1),
        a=np.full_like(u[1], 7.5),
        b=4.5 + 0.5 * u[1],
        angle=radial,
    )
    stroma = replace(stroma, amp=stroma.amp * ((r == 0) | (q > 1.4)))  # none in or at a lumen
    return epithelial.where(np.abs(snap) < 10, stroma)


def _solid(u: np.ndarray, present: np.ndarray, along: np.ndarray) -> _Nuclei:
    """Sheets of small round nuclei (semi-axes 5.2-6 px)."""
    a = 5.2 + 0.8 * u[1]
    return _Nuclei(
        amp=np.where(u[0] < 0.93 * present, 0.95 + 0.25 * u[5], 0.0),
        ox=_jitter(u[3], 4),
        oy=_jitter(u[4], 4),
        a=a,
        b=a * (0.85 + 0.15 * u[2]),
        angle=2 * np.pi * u[6],
    )


def _spindle(u: np.ndarray, present: np.ndarray, along: np.ndarray) -> _Nuclei:
    """Elongated nuclei (semi-axes 10-12 x 2.4-2.9 px) along the wavy collagen."""
    return _Nuclei(
        amp=np.where(u[0] < 0.6 * present, 1.05 + 0.3 * u[5], 0.0),
        ox=_jitter(u[3], 3),
        oy=_jitter(u[4], 3),
        a=10.0 + 2.0 * u[1],
        b=2.4 + 0.5 * u[2],
        angle=along + 0.25 * (u[6] - 0.5),
    )


def _pleomorphic(u: np.ndarray, present: np.ndarray, along: np.ndarray) -> _Nuclei:
    """Sparse large nuclei of varied size (semi-axes 6.5-10 px), shape, tilt and darkness."""
    a = 6.5 + 3.5 * u[1]
    return _Nuclei(
        amp=np.where(u[0] < 0.5 * present, 0.8 + 0.6 * u[5], 0.0),
        ox=_jitter(u[3], 4),
        oy=_jitter(u[4], 4),
        a=a,
        b=a * (0.6 + 0.4 * u[2]),
        angle=2 * np.pi * u[6],
    )


_CLASS_NUCLEI: dict[int, Callable[[np.ndarray, np.ndarray, np.ndarray], _Nuclei]] = {
    1: _solid,
    2: _spindle,
    3: _pleomorphic,
}
# nest field offset per class: the share of tissue in epithelial nests (rest: stroma)
_NEST_LEVEL = (0.0, 0.45, 2.0, 0.25)
# Stroma per class: eosin density, hematoxylin density, and share of lattice points with a
# fibroblast nucleus. Balanced so that, for one stain, the classes have about the same mean
# colour (glands have pale lumens and fewer nuclei, sheets many nuclei).
_EOSIN = (0.53, 0.55, 0.60, 0.55)
_COUNTERSTAIN = (0.09, 0.05, 0.05, 0.05)
_STROMAL_NUCLEI = (0.5, 0.2, 0.2, 0.2)


def _lumen_edge(lumens: tuple[np.ndarray, ...], local: np.ndarray, edge_width: float, out: np.ndarray) -> np.ndarray:
    """Distance outside the lumen in edge widths, + 0.5, (nby, L, nbx, L), from the gland of
    each block's centre (lumens end well inside their cell, so no block meets another's).
    Uses r (q - 1) / 2, which is the distance to the ellipse near its rim (all that the
    clip to [0, 1] keeps) and has the right sign everywhere."""
    dx0, dy0, m11, m12, m22, r = (v[:, None, :, None] for v in lumens)
    off = local - _CELL / 2
    dx = dx0 + off[None, None, None, :]  # (nby, 1, nbx, L)
    dy = dy0 + off[None, :, None, None]  # (nby, L, nbx, 1)
    gain = np.where(r > 0, r / (2 * edge_width), 0)  # no gland: q * 0 + inf
    q = np.add((gain * m11) * dx * dx, (gain * m22) * dy * dy, out=out)
    q += np.multiply(2 * gain * m12 * dx, dy, out=_work("tmp2", out.shape))
    q += np.where(r > 0, 0.5 - gain, np.inf)
    return q


def _draw_nuclei(nuclei: _Nuclei, local: np.ndarray, step: int, out: np.ndarray) -> np.ndarray:
    """Hematoxylin density (nby, L, nbx, L), into `out`, of the nuclei of the four lattice
    points at the corners of each block. Nuclei stay within CELL px of their lattice point
    (see `_quadratic_forms`), so these four are the only ones that reach a block."""
    amp, px, py, pxy, ox, oy = _quadratic_forms(nuclei, step)
    acc = out
    acc.fill(0)
    tmp, cross = _work("tmp", acc.shape), _work("tmp2", acc.shape)
    m, n = amp.shape
    for cy in (0, 1):
        for cx in (0, 1):
            sl = (slice(cy, cy + m - 1), slice(cx, cx + n - 1))
            a = amp[sl][:, None, :, None]
            if not a.any():
                continue
            dx = (local - cx * _CELL)[None, None, None, :] - ox[sl][:, None, :, None]  # (nby, 1, nbx, L)
            dy = (local - cy * _CELL)[None, :, None, None] - oy[sl][:, None, :, None]  # (nby, L, nbx, 1)
            ak = _MESA * a
            # A*k*(1 - q) with q = px dx² + 2 pxy dx dy + py dy², split so that only two
            # products are full size; clipping at A makes the flat core
            u1 = ak * (0.5 - px[sl][:, None, :, None] * dx * dx)
            u2 = ak * (0.5 - py[sl][:, None, :, None] * dy * dy)
            u3 = (-2 * ak) * pxy[sl][:, None, :, None] * dx
            np.add(u1, u2, out=tmp)
            tmp += np.multiply(u3, dy, out=cross)
            np.minimum(tmp, a, out=tmp)
            np.maximum(acc, tmp, out=acc)  # overlapping nuclei do not add up
    return acc


def _quadratic_forms(n: _Nuclei, step: int) -> tuple[np.ndarray, ...]:
    """Nucleus shapes blurred by one sample (`step` px), float32 (amp, px, py, pxy, ox, oy):
    the rim is px dx² + 2 pxy dx dy + py dy² = 1 around the centre (ox, oy), and the peak
    `amp` is lowered to keep the hematoxylin mass. Offsets are clamped so every nucleus
    stays within CELL px of its lattice point."""
    c, s = np.cos(n.angle), np.sin(n.angle)
    a2, b2 = n.a**2, n.b**2
    blur = _BLUR_PER_STEP2 * step * step
    sxx = a2 * c * c + b2 * s * s + blur
    syy = a2 * s * s + b2 * c * c + blur
    sxy = (a2 - b2) * c * s
    det = sxx * syy - sxy * sxy
    amp = n.amp * n.a * n.b / np.sqrt(det)
    room_x, room_y = np.maximum(_CELL - np.sqrt(sxx), 0), np.maximum(_CELL - np.sqrt(syy), 0)
    ox, oy = np.clip(n.ox, -room_x, room_x), np.clip(n.oy, -room_y, room_y)
    return tuple(v.astype(np.float32) for v in (amp, syy / det, sxx / det, -sxy / det, ox, oy))


def _fibre_attenuation(step: int) -> float:
    """Contrast left of the collagen streaks after a box blur of one sample (Gaussian
    approximation); 0 where the sampling cannot represent them (Nyquist)."""
    if 2 * step >= _FIBRE_WAVELENGTH:
        return 0.0
    return math.exp(-2 * math.pi**2 * (step * step / 12) / _FIBRE_WAVELENGTH**2)


def _sample_hash(sx0: int, sy0: int, nbx: int, nby: int, n: int, salt: int) -> np.ndarray:
    """uint32 hash (a work array) of global sample indices, in the block layout (nby, L, nbx,
    L). One multiply-xorshift round: plenty for dither and chromatin grain, and cheap."""
    sx = (sx0 + np.arange(nbx * n, dtype=np.int64)).reshape(1, 1, nbx, n).astype(np.uint32)
    sy = (sy0 + np.arange(nby * n, dtype=np.int64)).reshape(nby, n, 1, 1).astype(np.uint32)
    shape = (nby, n, nbx, n)
    h = _work("hash", shape, np.uint32)
    np.bitwise_xor(sx * np.uint32(0x8DA6B343), sy * np.uint32(0xD8163841) + np.uint32(salt), out=h)
    shifted = _work("hash2", shape, np.uint32)
    h ^= np.right_shift(h, np.uint32(15), out=shifted)
    h *= np.uint32(0x2C1B3C6D)
    h ^= np.right_shift(h, np.uint32(12), out=shifted)
    return h


def _sample_uniforms(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three uniform [0, 1) float32 noises (256 levels, work arrays) from bytes 1-3 of a hash
    (byte 0 mixes least)."""
    octets = h.view(np.uint8).reshape(h.shape + (4,))  # little-endian: byte i = bits 8i..8i+7
    scale = np.float32(1 / 256)
    return tuple(np.multiply(octets[..., i], scale, out=_work(f"u{i}", h.shape)) for i in (1, 2, 3))


class _Workspace(threading.local):
    """Work arrays kept from one render to the next, per thread (about 13 arrays of up to
    1 MiB). Allocating them afresh each call makes glibc return the pages to the OS and
    fault them in again, which on VMs cost more than the arithmetic (renders ran 1.6x
    slower, glass 4x)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
        size = math.prod(shape)
        buf = self.arrays.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.arrays[name] = np.empty(size, dtype)
        return buf[:size].reshape(shape)


_work = _Workspace()


def _integer_downsample(downsample: float) -> int:
    d = int(round(downsample))
    if d < 1 or abs(d - downsample) > 1e-9:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    return d


def _sample_step(d: int, x: int, y: int) -> int:
    """Largest power of two <= 8 that divides the downsample and the origin."""
    step = _MAX_STEP
    while step > 1 and (d % step or x % step or y % step):
        step //= 2
    return step


def _box_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Average f x f pixel squares of an RGB uint8 image (h*f, w*f, 3) -> (h, w, 3)."""
    if f == 1:
        return img
    h, w = img.shape[0] // f, img.shape[1] // f
    mean = img.reshape(h, f, w, f, 3).mean(axis=(1, 3), dtype=np.float32)
    return (mean + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- writing


def level_downsamples(width: int, height: int, n_levels: int | None = None) -> list[int]:
    """Pyramid downsamples 1, 4, 16, ...: `n_levels` of them, or until the long side of the
    last level is at most 1024 px. A level is never smaller than 1 px."""
    ds = [1]
    while True:
        more = len(ds) < n_levels if n_levels is not None else max(width, height) // ds[-1] > _MIN_PYRAMID_SIDE
        if not more or min(width, height) // (ds[-1] * 4) < 1:
            return ds
        ds.append(ds[-1] * 4)


def _tiles(renderer: SlideRenderer, width: int, height: int, d: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles (tile, tile, 3) of a level of size width x height (level px), row by row.

    Rendered a few tiles at a time: wider calls spread the per-call overhead while their
    work arrays (about 0.5 MB each) still fit in cache."""
    per_call = max(1, 512 // tile)
    n_x = -(-width // tile)
    for ty in range(-(-height // tile)):
        for tx0 in range(0, n_x, per_call):
            k = min(per_call, n_x - tx0)
            strip = renderer.region(tx0 * tile * d, ty * tile * d, k * tile, tile, d)
            for i in range(k):
                yield strip[:, i * tile : (i + 1) * tile]


def _default_magnification(mpp: float | None) -> float | None:
    """The nearest usual objective for an mpp (10x per µm/px: 0.5 -> 20x, 0.25 -> 40x)."""
    if mpp is None:
        return None
    usual = np.array([2.5, 5, 10, 20, 40, 60, 80, 100])
    return float(usual[np.argmin(np.abs(np.log(usual * mpp / 10)))])


def write_slide(
    path: str | Path,
    width: int,
    height: int,
    renderer: SlideRenderer,
    *,
    mpp: float | None = 0.5,
    tile_size: int = 256,
    jpeg_quality: int = 90,
    vendor: str = "aperio",
    n_levels: int | None = None,
    objective_power: float | None = None,
) -> Path:
    """Write a tiled, JPEG-compressed pyramidal TIFF of `width` x `height` level-0 px, streamed
    tile by tile from `renderer` (memory stays bounded whatever the size).

    Levels have downsamples 1, 4, 16, ... (`level_downsamples`), each rendered at its own
    downsample. `mpp` (µm per level-0 px) goes into the resolution tags (pixels per cm);
    None writes no resolution so readers report no mpp.

    `vendor="aperio"` writes an SVS: Aperio ImageDescription (`AppMag` = `objective_power`,
    by default the usual objective for the mpp; `MPP` omitted when mpp is None) and a
    stripped thumbnail as the second page, which openslide and tiffslide both read as an
    Aperio slide. `vendor="generic"` writes a plain pyramidal TIFF whose reduced levels are
    marked as such (NewSubfileType 1); it carries no objective power.
    Large slides (> 4 GiB raw) are written as BigTIFF. Returns `path`.
    """
    if vendor not in ("aperio", "generic"):
        raise ValueError(f"vendor must be 'aperio' or 'generic', got {vendor!r}")
    path = Path(path)
    downsamples = level_downsamples(width, height, n_levels)
    power = objective_power if objective_power is not None else _default_magnification(mpp)
    common = dict(
        photometric="rgb",  # tifffile stores JPEG tiles as YCbCr 4:2:0 itself
        compression="jpeg",
        compressionargs={"level": jpeg_quality},
        metadata=None,  # no tifffile JSON description, which would hide the Aperio header
        maxworkers=1,  # with threads tifffile buffers hundreds of MB of tiles ahead
    )
    if mpp is not None:
        common.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    else:
        common.update(resolution=None, resolutionunit="NONE")
    bigtiff = width * height * 3 > 2**32
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, d in enumerate(downsamples):
            w, h = max(1, width // d), max(1, height // d)
            if vendor == "aperio":
                desc = _aperio_description(width, height, w, h, tile_size, jpeg_quality, mpp, power, level)
                subfiletype = 0  # Aperio levels are plain pages; tifffile stops its SVS levels at reduced ones
            else:
                desc, subfiletype = None, 1 if level else 0  # openslide finds generic levels by this flag
            tif.write(
                _tiles(renderer, w, h, d, tile_size),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                description=desc,
                subfiletype=subfiletype,
                **common,
            )
            if level == 0 and vendor == "aperio":
                _write_thumbnail(tif, renderer, width, height, common)
    return path


def _aperio_description(
    width: int, height: int, w: int, h: int, tile: int, quality: int, mpp: float | None, power: float | None, level: int
) -> str:
    if level:
        return f"{APERIO_HEADER} \n{width}x{height} ({tile}x{tile}) -> {w}x{h} JPEG/RGB Q={quality}"
    parts = [f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"]
    if power is not None:
        parts.append(f"AppMag = {power:g}")
    if mpp is not None:
        parts.append(f"MPP = {mpp:.6g}")
    return f"{APERIO_HEADER} \n" + "|".join(parts)


def _write_thumbnail(tif: tifffile.TiffWriter, renderer: SlideRenderer, width: int, height: int, common: dict) -> None:
    """Aperio's second page: a small stripped image, at most 768 px on its long side."""
    d = 1
    while max(width, height) / d > _THUMB_MAX:
        d *= 2
    w, h = max(1, width // d), max(1, height // d)
    thumb = renderer.region(0, 0, w, h, d)
    tif.write(thumb, description=f"{APERIO_HEADER} \n{width}x{height} -> {w}x{h} - ", rowsperstrip=16, **common)


def write_he_slide(
    path: str | Path,
    width: int = 2048,
    height: int = 1536,
    *,
    tissue_class: int = 0,
    stain_seed: int = 0,
    seed: int = 0,
    pen_marks: bool = False,
    tissue: bool = True,
    **writer,
) -> Path:
    """One call for an H&E slide: `HETissueRenderer` options, then `write_slide` options."""
    renderer = HETissueRenderer(
        width, height, tissue_class=tissue_class, stain_seed=stain_seed, seed=seed, pen_marks=pen_marks, tissue=tissue
    )
    return write_slide(path, width, height, renderer, **writer)


def write_blank_slide(path: str | Path, width: int = 2048, height: int = 1536, **writer) -> Path:
    """Empty glass, no tissue (for tissue-detection edge cases)."""
    return write_he_slide(path, width, height, tissue=False, **writer)


def write_small_slide(path: str | Path, width: int = 200, height: int = 150, **options) -> Path:
    """A slide smaller than one 256 px tile (one pyramid level)."""
    return write_he_slide(path, width, height, **options)


def write_no_mpp_slide(path: str | Path, width: int = 2048, height: int = 1536, **options) -> Path:
    """A generic pyramidal TIFF without resolution tags: readers report no mpp."""
    return write_he_slide(path, width, height, mpp=None, vendor="generic", **options)


# ----------------------------------------------------------------------------- cohort


MANIFEST_COLUMNS = ("slide_path", "patient_id", "slide_id", "label", "split")


def make_demo_cohort(
    out_dir: str | Path,
    *,
    n_patients: int = 6,
    slides_per_patient: tuple[int, int] = (1, 2),
    n_classes: int = 2,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
    seed: int = 0,
    tcga_names: bool = True,
) -> Path:
    """Write a labelled synthetic cohort into `out_dir` and return its ``manifest.csv``.

    Patient i (from 0) has class i mod `n_classes` (label `CLASS_NAMES[class]`) and a number
    of slides drawn from the inclusive range `slides_per_patient`; every slide has its own
    layout and stain seed. Slides go to ``out_dir/slides/`` as Aperio SVS named like TCGA
    diagnostic slides, ``TCGA-HL-0001-01Z-00-DX1.<uuid>.svs`` (patient ``TCGA-HL-0001``,
    slide id ``TCGA-HL-0001-01Z-00-DX1``, a second slide ``...-DX2``), or ``P0001_S1.svs``
    without `tcga_names`. The manifest columns are slide_path (relative to the manifest's
    folder), patient_id, slide_id, label, split; splits are per patient, stratified by
    class, about 1/3 of each class's patients in "test" (at least one when the class has
    two or more patients). Same seed, same files byte for byte.
    """
    if not 1 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes must be 1..{len(CLASS_NAMES)}, got {n_classes}")
    lo, hi = slides_per_patient
    if n_patients < 1 or not 1 <= lo <= hi:
        raise ValueError("need n_patients >= 1 and 1 <= min <= max slides per patient")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0xC0F0])
    classes = [i % n_classes for i in range(n_patients)]
    counts = rng.integers(lo, hi + 1, n_patients)
    splits = _stratified_split(classes, rng)
    rows = []
    for i, (cls, count, split) in enumerate(zip(classes, counts, splits)):
        patient = f"TCGA-HL-{i + 1:04d}" if tcga_names else f"P{i + 1:04d}"
        for k in range(int(count)):
            layout_seed, stain_seed = (int(v) for v in rng.integers(0, 2**31, 2))
            if tcga_names:
                slide_id = f"{patient}-01Z-00-DX{k + 1}"
                name = f"{slide_id}.{uuid.UUID(bytes=rng.bytes(16), version=4)}.svs"
            else:
                slide_id = f"{patient}_S{k + 1}"
                name = f"{slide_id}.svs"
            write_he_slide(
                out / "slides" / name, width, height, tissue_class=cls, stain_seed=stain_seed, seed=layout_seed, mpp=mpp
            )
            rows.append((f"slides/{name}", patient, slide_id, CLASS_NAMES[cls], split))
    manifest = out / "manifest.csv"
    write_csv(manifest, MANIFEST_COLUMNS, rows)
    return manifest


def _stratified_split(classes: list[int], rng: np.random.Generator) -> list[str]:
    """'train'/'test' per patient: about 1/3 of each class in test, at least one of a class
    with two or more patients, so both splits see every class when they can."""
    splits = ["train"] * len(classes)
    for c in sorted(set(classes)):
        members = [i for i, k in enumerate(classes) if k == c]
        n_test = max(1, round(len(members) / 3)) if len(members) >= 2 else 0
        for i in rng.permutation(members)[:n_test]:
            splits[int(i)] = "test"
    return splits
