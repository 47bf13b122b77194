"""Fetch one MVTec AD category from MVTec's official per-category archives.

Each category is its own ``.tar.xz`` (60 MB to 1.3 GB) instead of the 4.9 GB bundle, so
``--categories bottle`` only downloads bottle. The archive is written to ``<root>/.<category>.tar.xz.part``
(an interrupted download resumes from there with an HTTP Range request, or restarts if the server
ignores it), checked by listing it, extracted into a temporary folder and only then moved to
``<root>/<category>``: a half-extracted category never appears under its real name.

The data is CC BY-NC-SA 4.0 (non-commercial), (c) MVTec Software GmbH; cite Bergmann et al., CVPR 2019.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from datasets.mvtec import is_category_present
from utils.errors import DataError

MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_BASE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
CATEGORY_URLS = {
    "bottle": f"{_BASE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_BASE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_BASE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_BASE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_BASE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_BASE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_BASE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_BASE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": f"{_BASE}/420938129-1629953099/pill.tar.xz",
    "screw": f"{_BASE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_BASE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_BASE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_BASE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_BASE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_BASE}/420938385-1629953449/zipper.tar.xz",
}
MVTEC_CATEGORIES = tuple(CATEGORY_URLS)


def ensure_category(data_root: str | Path, category: str, download: bool = True,
                    url: str | None = None) -> Path:
    """Return ``<data_root>/<category>``, downloading it first when it is missing and allowed."""
    category_dir = Path(data_root) / category
    if is_category_present(category_dir):
        return category_dir
    where = f"put it so that {category_dir}/train/good exists (from {MVTEC_PAGE})"
    if not download:
        raise DataError(f"category '{category}' not found in --data-root {data_root}: {where}, "
                        "or drop --no-download")
    url = url or CATEGORY_URLS.get(category)
    if url is None:
        raise DataError(f"category '{category}' not found in --data-root {data_root} and it is not "
                        f"an MVTec AD category that can be downloaded: {where}")
    Path(data_root).mkdir(parents=True, exist_ok=True)
    archive = Path(data_root) / f".{category}.tar.xz.part"
    try:
        _download(url, archive, desc=f"download {category}")
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise DataError(f"could not download MVTec AD '{category}' ({error}); without network, "
                        f"{where}") from None
    _verify_and_extract(archive, Path(data_root), category)
    archive.unlink()
    return category_dir


def _download(url: str, target: Path, desc: str, chunk: int = 1 << 20) -> None:
    done = target.stat().st_size if target.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        resumed = getattr(response, "status", None) == 206
        if not resumed:
            done = 0  # server ignored the range (or a file:// URL): start over
        length = response.headers.get("Content-Length")
        total = int(length) + done if length else None
        with open(target, "ab" if resumed else "wb") as out, \
                tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=desc) as bar:
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))


def _verify_and_extract(archive: Path, data_root: Path, category: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated file fails here
            prefix = f"{category}/train/good/"
            if not any(m.name.lstrip("./").startswith(prefix) for m in members):
                raise DataError(f"{archive} does not hold {prefix}; delete it and download again")
            staging = Path(tempfile.mkdtemp(prefix=f".{category}.", dir=data_root))
            try:
                tar.extractall(staging, members=members, filter="data")
                shutil.move(str(staging / category), str(data_root / category))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as error:
        archive.unlink(missing_ok=True)  # corrupt: the next run restarts from scratch
        raise DataError(f"the downloaded archive for '{category}' is corrupt ({error}); run again "
                        "to download it anew") from None
