"""Tissue detection on a low-resolution view of an H&E slide, with every parameter in physical units.

The input is an ``(h, w, 3) uint8`` RGB thumbnail or low pyramid level, its ``scale`` (level-0 px per
image px, x and y) and the slide's ``mpp0`` (µm per level-0 px, x and y). One image pixel then covers
``scale_x * mpp0_x * scale_y * mpp0_y`` µm², and every area (µm²) and radius (µm) below is converted to
pixels at that resolution, so the same tissue gives the same mask whatever the thumbnail's size.
A view of about 4-16 µm/px is the intended input (the pipeline's default is 8 µm/px).

Algorithm
---------
1. **Dark pixels** (brightest channel below ``dark_value``) are never tissue: black padding that
   readers return outside the scanned area, scanner margins, black ink. HSV saturation is
   meaningless there (noise over a tiny denominator), which is why they are set apart first.
2. **White balance.** The glass colour is the median RGB of the brightest 5 % of the other pixels,
   leaving out pure white (255, 255, 255: a reader's fill outside the scanned area, or clipped glass,
   which carry no tint). If it is bright and nearly grey (HSV saturation at most ``glass_max_tint``)
   every channel is divided by it, which removes a tint of the glass or of the scanner's light;
   otherwise (a view with no glass, whose brightest pixels are pale tissue) only its brightness is used.
3. **Chroma.** ``max(rgb) - min(rgb)`` of the balanced pixel, in units of the glass brightness and
   with channels brighter than the glass clipped to it (sensor clipping, white fill): the HSV
   saturation scaled by relative brightness. Stain gives colour, glass gives none; unlike
   saturation, chroma is not inflated in dim, grey areas (uneven illumination, shadows, margins), so
   no separate brightness ceiling is needed to drop glass.
4. **Threshold.** Otsu's threshold on the chroma of the non-dark pixels, clipped to
   ``[chroma_floor, chroma_cap]``. The floor keeps glass noise out on a view with little or no
   tissue (Otsu then splits the noise); the cap keeps pale tissue (lightly stained, adipose-rich)
   in, since on a typical slide Otsu falls between pale and strongly stained tissue.
5. **Ink** (``reject_pen``). Coloured ink is a pixel whose HSV hue (after white balance) and
   saturation fall in one of ``ink_hues``, ``(lo°, hi°, least saturation)`` each. H&E has red
   above green (hue about 250-360° and 0-20°: purple, magenta, pink), so the defaults are green
   (70-180°, 0.2) and blue (180-230°, 0.25) ink, plus deep blue (230-250°, 0.55): blue ink over
   stain, which bluish hematoxylin approaches in hue (235-240°) but not in saturation (0.5 at
   most on a real H&E region at 4-8 µm/px). Ranges must lie within 60-270°. Black ink is a dark
   region that does not touch the image's edge (dark regions at the edge are margins or padding;
   black ink that runs off the image is still never tissue, but is not reported as ink). An
   opening of diameter ``pen_min_width_um`` then drops what is too thin to be a marker stroke
   (scattered bluish nuclei, dark specks). Red ink cannot be told from eosin and is not looked
   for; a thin black stroke over tissue, averaged with the stain at thumbnail resolution, may not
   be dark enough to be seen.
6. **Mask.** Pixels at or above the threshold, not dark and not ink; then a binary opening
   (radius ``opening_radius_um``, removes isolated noisy pixels and thin fibres), a closing (radius
   ``closing_radius_um``, joins loose tissue), filling of holes up to ``max_hole_um2`` (holes
   touching the image's edge are never filled). Ink is removed after the filling (else small strokes
   across tissue would be filled back) together with a ``pen_margin_um`` margin around it (the
   stroke's blurred edge mixes ink with stain and looks like tissue). Last, tissue regions smaller
   than ``min_component_um2`` are dropped. A view with no tissue gives an all-False mask.

Radii and areas are rounded to whole pixels; a radius under half a pixel disables its operation.
Tissue regions are 8-connected, holes 4-connected. Black ink and dark tissue folds inside tissue
look the same: both are removed. In a view with no glass at all the palest tissue is taken for
glass (step 2), and tissue paler than ``chroma_cap`` above it may be lost.

Defaults: chroma threshold within 0.04-0.08 of the glass brightness (real glass is about 0.01,
pale pink stroma 0.1 and above), dark below 25 % of full scale, opening 4 µm, closing 16 µm, holes
up to 20,000 µm² filled, regions under 10,000 µm² (0.01 mm², a 100 µm square) dropped, ink at
least 30 µm wide with a 24 µm margin around it. The work is a few passes over the image, three
connected-component labellings and binary morphology by row-decomposed disks, each on the
bounding box of what it acts on: about 0.2-0.3 s for a 2000 x 2000 px view on one core.

:meth:`TissueMask.tile_fractions` then gives every tile's exact tissue fraction from a summed-area
table, with partial pixels at the tile's edges weighted by their covered area.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

__all__ = ["TissueParams", "TissueMask", "detect_tissue", "hue_degrees"]

_GLASS_QUANTILE = 95.0  # percent: pixels brighter than this are the glass sample for the white point
_STATS_PIXELS = 250_000  # about this many pixels are enough for the white point and Otsu's threshold
_CONNECT8 = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`detect_tissue`; see the module docstring for how each is used.

    chroma_floor, chroma_cap: bounds of the chroma threshold, fractions of the glass brightness.
    dark_value:          pixels whose brightest channel is below this fraction of 255 are dark.
    glass_max_tint:      the largest HSV saturation of a white point accepted as glass colour.
    opening_radius_um:   opening radius, µm (0 disables).
    closing_radius_um:   closing radius, µm (0 disables).
    max_hole_um2:        holes in tissue up to this area are filled, µm² (0 disables).
    min_component_um2:   tissue regions smaller than this are dropped, µm².
    reject_pen:          detect blue, green and black ink and remove it from the mask.
    ink_hues:            coloured ink: ``(lo, hi, s)`` = hue in [lo, hi] degrees with HSV saturation >= s.
    pen_min_width_um:    ink narrower than this is ignored (an opening), µm.
    pen_margin_um:       tissue within this distance of ink is dropped too, µm.
    """

    chroma_floor: float = 0.04
    chroma_cap: float = 0.08
    dark_value: float = 0.25
    glass_max_tint: float = 0.15
    opening_radius_um: float = 4.0
    closing_radius_um: float = 16.0
    max_hole_um2: float = 20_000.0
    min_component_um2: float = 10_000.0
    reject_pen: bool = True
    ink_hues: tuple[tuple[float, float, float], ...] = (
        (70.0, 180.0, 0.20),  # green
        (180.0, 230.0, 0.25),  # blue
        (230.0, 250.0, 0.55),  # deep blue: blue ink over stain
    )
    pen_min_width_um: float = 30.0
    pen_margin_um: float = 24.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.chroma_floor <= self.chroma_cap <= 1.0:
            raise ValueError(
                f"need 0 <= chroma_floor <= chroma_cap <= 1, got {self.chroma_floor}, {self.chroma_cap}"
            )
        for name in ("dark_value", "glass_max_tint"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must be between 0 and 1")
        for name in ("opening_radius_um", "closing_radius_um", "max_hole_um2", "min_component_um2",
                     "pen_min_width_um", "pen_margin_um"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        inks = tuple(tuple(float(v) for v in ink) for ink in self.ink_hues)
        for ink in inks:
            # outside 60-270° ink overlaps H&E's hues (and _detect_pen's pre-filter assumes it)
            if len(ink) != 3 or not (60.0 <= ink[0] <= ink[1] <= 270.0 and 0.0 <= ink[2] <= 1.0):
                raise ValueError(f"ink_hues entry {ink} must be (lo, hi, saturation), 60 <= lo <= hi <= 270")
        object.__setattr__(self, "ink_hues", inks)  # lists (from JSON or YAML) become hashable tuples

    def to_dict(self) -> dict:
        """JSON-serialisable parameters in field order (stable across runs, for hashing and attrs)."""
        d = asdict(self)
        d["ink_hues"] = [list(ink) for ink in self.ink_hues]
        return d


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, compare masks explicitly
class TissueMask:
    """A tissue mask over the whole slide at low resolution.

    mask:      ``(h, w) bool``, True = tissue, in mask pixels.
    scale:     level-0 px per mask px, ``(sx, sy)``.
    pen_mask:  ``(h, w) bool`` ink found (before the safety margin), for QC; None if not looked for.
    threshold: the chroma threshold used (fraction of the glass brightness), for QC.
    """

    mask: np.ndarray
    scale: tuple[float, float]
    pen_mask: np.ndarray | None = None
    threshold: float = float("nan")

    @property
    def fraction(self) -> float:
        """Fraction of the mask's pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @cached_property
    def _integral(self) -> np.ndarray:
        """``(h + 1, w + 1) float64`` summed-area table: ``[j, i]`` = tissue pixels in ``mask[:j, :i]``."""
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), dtype=np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
        return table

    def tile_fractions(self, coords: np.ndarray, footprint: float | tuple[float, float]) -> np.ndarray:
        """Tissue fraction of each tile, exact to floating point.

        coords:    ``(N, 2)`` level-0 (x, y) of the tiles' top-left corners.
        footprint: tile side in level-0 px, one number or ``(x, y)``; need not be whole.
        Returns ``(N,) float32`` in [0, 1]: the area of the tile rectangle covered by tissue over its
        area. Mask pixels cut by the tile's edge count with the area inside it; parts of the tile
        outside the mask count as non-tissue.
        """
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise ValueError(f"coords must be (N, 2), got shape {coords.shape}")
        fw, fh = (float(footprint), float(footprint)) if np.isscalar(footprint) else map(float, footprint)
        if not (fw > 0 and fh > 0):
            raise ValueError(f"footprint must be positive, got {footprint}")
        if coords.shape[0] == 0 or self.mask.size == 0:
            return np.zeros(coords.shape[0], dtype=np.float32)
        sx, sy = self.scale
        x0 = coords[:, 0].astype(np.float64) / sx
        y0 = coords[:, 1].astype(np.float64) / sy
        x1, y1 = x0 + fw / sx, y0 + fh / sy
        cum = self._cumulative
        covered = cum(x1, y1) - cum(x0, y1) - cum(x1, y0) + cum(x0, y0)  # inclusion-exclusion, mask px²
        return np.clip(covered / ((fw / sx) * (fh / sy)), 0.0, 1.0).astype(np.float32)

    def _cumulative(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) in ``[0, u) x [0, v)``, ``u``, ``v`` real mask-px coordinates, ``(N,)``.

        Inside one pixel this area is bilinear in (u, v), so bilinear interpolation of the summed-area
        table is exact. Coordinates are clipped to the mask: nothing is added outside it.
        """
        table = self._integral
        h, w = self.mask.shape
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        i = np.minimum(np.floor(u).astype(np.int64), w - 1)  # u == w lands in the last pixel, a = 1
        j = np.minimum(np.floor(v).astype(np.int64), h - 1)
        a, b = u - i, v - j
        return ((1 - a) * (1 - b) * table[j, i] + a * (1 - b) * table[j, i + 1]
                + (1 - a) * b * table[j + 1, i] + a * b * table[j + 1, i + 1])


def detect_tissue(
    image: np.ndarray,
    scale: tuple[float, float],
    mpp0: tuple[float, float],
    params: TissueParams = TissueParams(),
) -> TissueMask:
    """Tissue mask of a low-resolution view of a slide.

    image:  ``(h, w, 3) uint8`` RGB (an alpha channel, if any, is ignored).
    scale:  level-0 px per image px, ``(sx, sy)``.
    mpp0:   µm per level-0 px, ``(x, y)``.
    Returns a :class:`TissueMask` with ``mask`` of shape ``(h, w)`` and the same ``scale``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"image must be (h, w, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if min(scale) <= 0 or min(mpp0) <= 0:
        raise ValueError(f"scale {scale} and mpp0 {mpp0} must be positive")
    px_um2 = scale[0] * mpp0[0] * scale[1] * mpp0[1]  # area of one image pixel, µm²
    px_um = math.sqrt(px_um2)  # side of one (square-equivalent) image pixel, µm
    scale = (float(scale[0]), float(scale[1]))
    # channel planes as views: reductions over a last axis of length 3 are an order of magnitude slower
    planes = tuple(image[..., c] for c in range(3))

    dark = np.maximum(np.maximum(planes[0], planes[1]), planes[2]) < params.dark_value * 255
    if dark.all():
        empty = np.zeros(dark.shape, dtype=bool)
        return TissueMask(empty, scale, empty.copy() if params.reject_pen else None, float("nan"))

    white = _white_point(planes, dark, params.glass_max_tint)
    balanced = tuple(np.multiply(planes[c], 1.0 / white[c], dtype=np.float32) for c in range(3))
    # channels brighter than the glass are clipped to it: pure white fill would otherwise turn coloured
    high = np.minimum(np.maximum(np.maximum(balanced[0], balanced[1]), balanced[2]), 1.0)
    chroma = high - np.minimum(np.minimum(np.minimum(balanced[0], balanced[1]), balanced[2]), 1.0)
    threshold = _chroma_threshold(chroma, dark, params)
    tissue = (chroma >= threshold) & ~dark

    pen = None
    if params.reject_pen:
        pen_radius = _px_radius(params.pen_min_width_um / 2, px_um)
        pen = _detect_pen(balanced, high, chroma, dark, params, pen_radius)
        tissue &= ~pen

    tissue = _opening(tissue, _px_radius(params.opening_radius_um, px_um))
    tissue = _closing(tissue, _px_radius(params.closing_radius_um, px_um))
    tissue = _fill_small_holes(tissue, _px_area(params.max_hole_um2, px_um2))
    if pen is not None and pen.any():
        tissue &= ~_dilate(pen, _px_radius(params.pen_margin_um, px_um))
    tissue = _drop_small(tissue, _px_area(params.min_component_um2, px_um2))
    return TissueMask(tissue, scale, pen, float(threshold))


def _px_radius(radius_um: float, px_um: float) -> int:
    """A radius in µm as whole image px (round half up)."""
    return int(math.floor(radius_um / px_um + 0.5))


def _px_area(area_um2: float, px_um2: float) -> int:
    """An area in µm² as a whole number of image px (round half up)."""
    return int(math.floor(area_um2 / px_um2 + 0.5))


def _sample(shape: tuple[int, int]) -> tuple[slice, slice]:
    """A strided view of about ``_STATS_PIXELS`` pixels, for statistics that need no more."""
    step = max(1, int(math.sqrt(shape[0] * shape[1] / _STATS_PIXELS)))
    return slice(None, None, step), slice(None, None, step)


def _white_point(planes: tuple[np.ndarray, ...], dark: np.ndarray, max_tint: float) -> np.ndarray:
    """``(3,) float32`` RGB of the glass, from the brightest pixels; grey if they are coloured.

    planes: the image's R, G, B, ``(h, w) uint8`` each.
    """
    view = _sample(dark.shape)
    r, g, b = (plane[view] for plane in planes)
    # pure white is padding (a reader's fill outside the scanned area) or clipped glass: no tint in it
    keep = ~dark[view] & (np.minimum(np.minimum(r, g), b) < 255)
    if not keep.any():  # nothing but padding (in the sample): neutral
        return np.full(3, 255.0, dtype=np.float32)
    r, g, b = r[keep], g[keep], b[keep]
    brightness = r.astype(np.int32) + g + b
    glass = brightness >= np.percentile(brightness, _GLASS_QUANTILE)
    white = np.array([np.median(r[glass]), np.median(g[glass]), np.median(b[glass])], dtype=np.float32)
    top = float(white.max())
    # a coloured "white" is pale tissue filling the view, not glass: balancing to it would erase that tissue
    if (top - float(white.min())) / top > max_tint or top < 128:
        white = np.full(3, top, dtype=np.float32)
    return white


def _chroma_threshold(chroma: np.ndarray, dark: np.ndarray, params: TissueParams) -> float:
    """Otsu's threshold on the chroma of non-dark pixels, clipped to ``[chroma_floor, chroma_cap]``."""
    view = _sample(dark.shape)
    values = chroma[view][~dark[view]]
    if values.size == 0 or values.min() == values.max():  # Otsu needs two levels
        return params.chroma_floor
    return float(np.clip(threshold_otsu(values), params.chroma_floor, params.chroma_cap))


def _detect_pen(
    balanced: tuple[np.ndarray, np.ndarray, np.ndarray],
    high: np.ndarray,
    chroma: np.ndarray,
    dark: np.ndarray,
    params: TissueParams,
    radius: int,
) -> np.ndarray:
    """``(h, w) bool`` blue, green and black ink (see the module docstring).

    balanced: white-balanced R, G, B planes; high, chroma: their max and max - min; all ``(h, w)``.
    radius:   of the opening that drops ink too thin to be a marker stroke, px.
    """
    r, g, b = balanced
    # pre-filter, cheap on whole planes: saturated enough for some ink, and hue at most the largest
    # ink hue: in 60-240° green >= red, up to hue h > 240° red exceeds green by at most (h-240)/60
    # of the chroma. Stain (red well above green) drops out here, so few pixels need a hue.
    least = min((s for _, _, s in params.ink_hues), default=1.0)
    above = max(max((hi for _, hi, _ in params.ink_hues), default=240.0) - 240.0, 0.0) / 60.0
    candidates = (chroma >= least * high) & (chroma > 0) & (r - g <= above * chroma) & ~dark
    where = np.flatnonzero(candidates)
    pen = np.zeros(dark.shape, dtype=bool)
    if where.size and params.ink_hues:
        hue = hue_degrees(r.ravel()[where], g.ravel()[where], b.ravel()[where])
        saturation = chroma.ravel()[where] / high.ravel()[where]
        ink = np.zeros(where.size, dtype=bool)
        for lo, hi, least_saturation in params.ink_hues:
            ink |= (hue >= lo) & (hue <= hi) & (saturation >= least_saturation)
        pen.ravel()[where] = ink
    pen |= _interior(dark)
    # scattered bluish nuclei or dark specks are not a stroke: an opening drops them
    return _opening(pen, radius)


def hue_degrees(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of ``(N,)`` float R, G, B with positive chroma."""
    high = np.maximum(np.maximum(r, g), b)
    c = high - np.minimum(np.minimum(r, g), b)
    sector = np.where(high == r, (g - b) / c % 6.0, np.where(high == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return 60.0 * sector


def _bbox(mask: np.ndarray, grow: int = 0) -> tuple[slice, slice]:
    """The smallest window holding every True pixel of a non-empty ``mask``, grown by ``grow`` px
    on each side within the image.

    Labelling and morphology dominate the run time; on the window they cost in proportion to its area.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(rows[0] - grow, 0), min(rows[-1] + 1 + grow, h)),
            slice(max(cols[0] - grow, 0), min(cols[-1] + 1 + grow, w)))


def _edge_labels(labels: np.ndarray, window: tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
    """Labels on the sides of ``labels`` (the image at ``window``) that lie on the image's edge."""
    rows, cols = window
    sides = [labels[0] if rows.start == 0 else None, labels[-1] if rows.stop == shape[0] else None,
             labels[:, 0] if cols.start == 0 else None, labels[:, -1] if cols.stop == shape[1] else None]
    return np.concatenate([side for side in sides if side is not None] + [np.zeros(1, labels.dtype)])


def _interior(mask: np.ndarray) -> np.ndarray:
    """The 8-connected regions of ``mask`` that do not touch the image's edge."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    window = _bbox(mask)
    labels, n = ndi.label(mask[window], structure=_CONNECT8)
    keep = np.ones(n + 1, dtype=bool)
    keep[_edge_labels(labels, window, mask.shape)] = False  # includes label 0, the background
    out[window] = keep[labels]
    return out


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its 8-connected regions of fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    window = _bbox(mask)
    labels, _ = ndi.label(mask[window], structure=_CONNECT8)
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False
    out = np.zeros_like(mask)
    out[window] = keep[labels]
    return out


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` with its 4-connected holes of at most ``max_px`` pixels filled; holes at the edge stay.

    Holes lie inside the mask's bounding box; background touching the box's sides joins the
    background outside it, which reaches the image's edge, so it is no hole.
    """
    if max_px <= 0 or not mask.any():
        return mask
    window = _bbox(mask)
    labels, _ = ndi.label(~mask[window])
    fill = np.bincount(labels.ravel()) <= max_px
    fill[0] = False
    fill[labels[0]] = fill[labels[-1]] = fill[labels[:, 0]] = fill[labels[:, -1]] = False
    out = mask.copy()
    out[window] |= fill[labels]
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by ``skimage.morphology.disk(radius)``; outside the image is background."""
    if radius <= 0 or not mask.any():
        return mask
    window = _bbox(mask, radius)  # nothing changes farther than radius from the mask
    out = np.zeros_like(mask)
    out[window] = _dilate_disk(mask[window], radius)
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by ``disk(radius)``; outside the image counts as tissue, so tissue cut by the
    image's edge is not eaten into."""
    if radius <= 0 or not mask.any():
        return mask
    # in the window, the band along a side inside the image is background, so what
    # _dilate_disk assumes beyond that side (tissue) changes nothing
    window = _bbox(mask, radius)
    out = np.zeros_like(mask)
    out[window] = ~_dilate_disk(~mask[window], radius)
    return out


def _dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a whole array by ``disk(radius)``, ``radius >= 1``; outside is background.

    The disk is the union of its rows: row ``dy`` is a horizontal run of half-width
    ``isqrt(radius² - dy²)``. Horizontal dilations by each half-width are built incrementally and
    ORed in at every row offset: about ``4 * radius`` whole-array ORs instead of ``π radius²`` (and
    about ten times faster than ``scipy.ndimage.binary_dilation`` at radius 2).
    """
    h, w = mask.shape
    half = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]
    padded = np.pad(mask, ((0, 0), (radius, radius)))
    runs = {0: mask}
    run = mask
    for k in range(1, radius + 1):
        run = run | padded[:, radius - k : radius - k + w] | padded[:, radius + k : radius + k + w]
        if k in half:
            runs[k] = run
    out = np.zeros((h + 2 * radius, w), dtype=bool)
    for dy in range(-radius, radius + 1):
        out[radius + dy : radius + dy + h] |= runs[half[abs(dy)]]
    return out[radius : radius + h]


def _opening(mask: np.ndarray, radius: int) -> np.ndarray:
    return _dilate(_erode(mask, radius), radius)


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    return _erode(_dilate(mask, radius), radius)
