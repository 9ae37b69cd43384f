"""Chroma subsampling against the source: what 4:4:4 and 4:2:0 tiles keep of a YCbCr 4:2:0 scan.

    python benchmarks/chroma.py                 # the real-texture SVS of tiling.py --cmu (made if missing)
    python benchmarks/chroma.py --slide my.svs  # any slide; level 0

Takes up to ``--tiles`` 256 px tissue tiles of level 0 (mean brightness below 225) at three kinds of
origin: on the 16 px JPEG coding-unit grid of the source (what ``auto`` stores at the source's
subsampling), 8 px off it (on the 8 px blocks, not on the units) and 1 px off; encodes each at JPEG
q90 4:4:4 and 4:2:0 with imagecodecs (as the store does) and prints, against the decoded source
pixels: PSNR of Y, Cb, Cr and RGB, bytes per tile and encode ms per tile (one thread, CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codecs import psnr  # noqa: E402
from pipeline.reader import open_slide  # noqa: E402


def ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF YCbCr (float64) of uint8 RGB ``(..., 3)``."""
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    return np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                     128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                     128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, help="default: tiling.py's real-texture SVS (YCbCr 4:2:0, 256 px tiles)")
    ap.add_argument("--tiles", type=int, default=150)
    args = ap.parse_args()
    if args.slide is None:
        import tiling

        args.slide = tiling.make_cmu_slide(tiling.OUT / "cmu_17760x17802_0.5.svs")
    rng = np.random.default_rng(0)
    with open_slide(args.slide, "tiffslide") as slide:
        w, h = slide.dimensions
        print(f"slide {args.slide.name}: {w} x {h} px, level 0 JPEG chroma {slide.level_chroma(0) or 'not YCbCr JPEG'}")
        picks = []
        while len(picks) < args.tiles:
            x, y = int(rng.integers(0, (w - 300) // 16)) * 16, int(rng.integers(0, (h - 300) // 16)) * 16
            if slide.read_region((x, y), 0, (256, 256)).mean() < 225:
                picks.append((x, y))
        print(f"{'origin':<22}{'sub':>5}{'Y dB':>8}{'Cb dB':>8}{'Cr dB':>8}{'RGB dB':>8}{'bytes':>8}{'enc ms':>8}")
        for name, off in (("on the 16 px grid", 0), ("8 px off it", 8), ("1 px off it", 1)):
            src = [slide.read_region((x + off, y + off), 0, (256, 256)) for x, y in picks]
            for sub in ("444", "420"):
                t = time.process_time()
                enc = [imagecodecs.jpeg8_encode(s, level=90, subsampling=sub) for s in src]
                ms = (time.process_time() - t) / len(src) * 1e3
                dec = [imagecodecs.jpeg8_decode(e) for e in enc]
                a, b = np.stack(src), np.stack(dec)
                ya, yb = ycbcr(a), ycbcr(b)
                ch = [psnr(ya[..., c], yb[..., c]) for c in range(3)]
                print(f"{name:<22}{sub:>5}{ch[0]:>8.2f}{ch[1]:>8.2f}{ch[2]:>8.2f}{psnr(a, b):>8.2f}"
                      f"{np.mean([len(e) for e in enc]):>8.0f}{ms:>8.3f}")


if __name__ == "__main__":
    main()
