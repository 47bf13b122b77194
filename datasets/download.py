"""Get one MVTec AD category: already there, dropped in as an archive, from a mirror, or from
MVTec's own per-category archives.

In order, for ``ensure_category(data_root, category)``:
1. ``<data_root>/<category>/train/good`` exists: nothing to do.
2. A drop-in: ``<data_root>/<category>.tar.xz`` (or the whole ``mvtec_anomaly_detection.tar.xz``)
   is there: it is checked and the category extracted from it, no network needed.
3. Downloads, each tried in turn until one works: the mirror (``--mirror URL`` or the environment
   variable ``MVTEC_AD_MIRROR``: a base URL, or a folder, under which ``<category>.tar.xz``
   lives, e.g. a lab's own copy), then every link MVTec has published for the category, newest
   first. MVTec rotates its share links (the 2021 ones answer HTTP 404 since November 2025), so
   the run says which one served the data.

A download goes to ``<data_root>/.<category>.tar.xz.part``; an interrupted transfer is resumed with
an HTTP Range request (a few times, then on the next run), or restarted if the server ignores the
range. Every archive is listed in full before anything is extracted (a truncated file fails
there and is deleted), extracted into a temporary folder and only then moved to
``<data_root>/<category>``: a half-extracted category never appears under its real name.

The MD5s MVTec published are for the 2021 archives; what the newer links serve may differ, so the
MD5 of what was extracted is recorded (``<category>/.source.json``, and so metrics.json) with
whether it matches the published one, as a check beside the structural one, not a gate.

The data is CC BY-NC-SA 4.0 (non-commercial), (c) MVTec Software GmbH; cite Bergmann et al., CVPR 2019.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import logging

from tqdm import tqdm

from datasets.mvtec import is_category_present
from utils.errors import DataError
from utils.files import probe_creatable

MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MIRROR_VARIABLE = "MVTEC_AD_MIRROR"
WHOLE_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
# The shares MVTec has served its archives from, newest first: since 2025, and 2021 (HTTP 404
# since November 2025). An archive keeps its file id across shares; the suffix after it changes.
_SHARES = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download",
           "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download")
_LINK_IDS = {  # archive -> (file id, suffix in each share, None where the share lacks it)
    "bottle": ("420937370", "1629958698", "1629951468"),
    "cable": ("420937413", "1629958794", "1629951498"),
    "capsule": ("420937454", "1629958872", "1629951595"),
    "carpet": ("420937484", "1629959013", "1629951672"),
    "grid": ("420937487", "1629959044", "1629951814"),
    "hazelnut": ("420937545", "1629959162", "1629951845"),
    "leather": ("420937607", "1629959262", "1629951964"),
    "metal_nut": ("420937637", "1629959294", "1629952063"),
    "pill": ("420938129", "1629960351", "1629953099"),
    "screw": ("420938130", "1629960389", "1629953152"),
    "tile": ("420938133", "1629960456", "1629953189"),
    "toothbrush": ("420938134", "1629960477", "1629953256"),
    "transistor": ("420938166", "1629960554", "1629953277"),
    "wood": ("420938383", "1629960649", "1629953354"),
    "zipper": ("420938385", "1629960680", "1629953449"),
    WHOLE_ARCHIVE: ("420938113", "1629960298", None),
}
MVTEC_CATEGORIES = tuple(name for name in _LINK_IDS if name != WHOLE_ARCHIVE)
# Every link known for a category, newest first (tests replace this to point at a local server).
CATEGORY_LINKS = {name: [f"{share}/{_LINK_IDS[name][0]}-{suffix}/{name}.tar.xz"
                         for share, suffix in zip(_SHARES, _LINK_IDS[name][1:]) if suffix]
                  for name in MVTEC_CATEGORIES}
# MD5 MVTec published for the 2021 archives
PUBLISHED_MD5 = {
    "bottle": "79b4d46b8647d969e323afef8d8445ff", "cable": "2ba411739e8239e7558ead13f18b0ead",
    "capsule": "380afc46701c99cb7b9a928edbe16eb5", "carpet": "5ce0a646d054d9e88195bd74c690de4b",
    "grid": "37239e47f99673bb73393b67ca4cc418", "hazelnut": "5c30a9e574a762d845ca79cf2f241b01",
    "leather": "e7971b60323840bfc36247e8d9c3598e", "metal_nut": "bfbc32e780827923f4b2c61923e364f7",
    "pill": "834e2d57f62cd4d8d74cd0a5775cc48b", "screw": "2e817e865841f4947db4ded51c13bb23",
    "tile": "d78d2c0f6d8bbe9cbe3b72a77bc3e328", "toothbrush": "53ba30bb7aeac103e28e1b83ae28ffb9",
    "transistor": "4fe2681f0ce1793cbf71d762f926d564", "wood": "b2478b1c65e9a470f360cc6173299d58",
    "zipper": "015bfd289a1782abc77318aa015a728d", WHOLE_ARCHIVE: "eefca59f2cede9c3fc5b6befbfec275e",
}
SOURCE_RECORD = ".source.json"
log = logging.getLogger(__name__)
RESUME_ATTEMPTS = 3


class _Failure(Exception):
    """One source that did not serve the archive, with a short reason for the final message."""

    def __init__(self, reason: str, http_status: int | None = None):
        super().__init__(reason)
        self.http_status = http_status


def _drop_in(data_root: Path, category: str) -> Path | None:
    """The archive put in the data root by hand that holds ``category``: its own, else the whole
    dataset's; None if neither is there."""
    return next((archive for archive in (data_root / f"{category}.tar.xz",
                                         data_root / WHOLE_ARCHIVE) if archive.is_file()), None)


def _refuse_a_file(data_root: Path) -> None:
    """A file where the data root should be would end the download in mkdir's traceback."""
    if data_root.exists() and not data_root.is_dir():
        raise DataError(f"{{data_root}} {data_root} is a file, not a folder; pass the folder "
                        "holding the category folders (or where they should be downloaded)")


def check_categories(data_root: str | Path, categories, download: bool) -> None:
    """What is wrong with the data root, said before any work (the backbone's download
    included): a file, or a category folder, as the data root; one that holds one's own
    categories and none of MVTec AD's (--custom forgotten); one that cannot be written when a
    category must be downloaded or extracted into it; and without downloads, every category
    neither on disk nor dropped in as an archive, all named at once rather than the first of them
    after the categories before it have run; and an incomplete category folder, which a fetch
    would not fill."""
    data_root = Path(data_root)
    _refuse_a_file(data_root)
    absent = [c for c in categories if not is_category_present(data_root / c)]
    if absent and is_category_present(data_root):
        ensure_category(data_root, absent[0], download=False)  # raises, naming the parent
    incomplete = [c for c in absent if os.path.lexists(data_root / c)]
    if incomplete:
        ensure_category(data_root, incomplete[0], download=False)  # raises, naming the folder
    undropped = [c for c in absent if _drop_in(data_root, c) is None]
    hint = _custom_hint(data_root) if undropped else ""  # only a missing category's errors say it
    if download and len(undropped) == len(MVTEC_CATEGORIES) and hint:
        # every MVTec category asked for (the default), none here, and folders of one's own
        # are: --custom forgotten, which would start a download of all 15 into them
        raise DataError(f"{{data_root}} {data_root} holds none of MVTec AD's categories{hint}; "
                        "to download MVTec AD beside them, name the categories with "
                        "{categories}")
    fetched = absent if download else [c for c in absent if c not in undropped]
    if fetched:
        _refuse_unwritable(data_root, fetched)
    missing = [] if download else undropped
    if len(missing) == 1 and len(categories) == 1:
        # ensure_category's one-category message; without a download it neither fetches nor,
        # the category having no archive here, extracts anything
        ensure_category(data_root, missing[0], download=False)
    if missing:
        raise DataError(f"categories not found in {{data_root}} {data_root}: "
                        f"{', '.join(missing)}; put each so that {data_root}/<category>/train/good "
                        f"exists (from {MVTEC_PAGE}), or drop {{download}}{hint}")


def _refuse_unwritable(data_root: Path, fetched: list[str]) -> None:
    """Categories to download or extract need a data root that can be written: a lab's read-only
    copy missing one would end in the first download's PermissionError traceback."""
    try:
        probe_creatable(data_root)
    except OSError as error:
        raise DataError(f"{', '.join(fetched)} would be fetched into {{data_root}} {data_root}, "
                        f"which cannot be written ({error.strerror}); give a {{data_root}} you can "
                        f"write to, or put each category there by hand (from {MVTEC_PAGE})") \
            from None


def _custom_hint(data_root: Path) -> str:
    """A data root of one's own categories given without --custom is read as MVTec AD's: the
    folders it does hold are named, with the flag that reads them."""
    own = sorted(p.name for p in data_root.iterdir() if p.name not in MVTEC_CATEGORIES
                 and is_category_present(p)) if data_root.is_dir() else []
    return f"; it holds {', '.join(own)}: for your own categories add {{custom}}" if own else ""


def ensure_category(data_root: str | Path, category: str, download: bool = True,
                    mirror: str | None = None, progress: bool = True) -> Path:
    """Return ``<data_root>/<category>``, getting it first when it is missing (module docstring)."""
    data_root = Path(data_root)
    category_dir = data_root / category
    if is_category_present(category_dir):
        return category_dir
    _refuse_a_file(data_root)
    if is_category_present(data_root):
        # Checked before any download, which would otherwise go into the category folder.
        raise DataError(f"category '{category}' not found in {{data_root}} {data_root}, which is "
                        f"itself a category folder (it has train/good); pass the folder holding "
                        f"the categories, e.g. {{data_root}} {data_root.parent}")
    if os.path.lexists(category_dir):
        # Extracting beside it would nest the category inside it (bottle/bottle/); never merged
        # into what is there, which is the user's
        raise DataError(f"{category_dir} exists but holds no readable train/good (an incomplete "
                        f"copy?): complete it, or move it away so that '{category}' can be "
                        "extracted there")
    where = f"put it so that {category_dir}/train/good exists (from {MVTEC_PAGE})"
    archive = _drop_in(data_root, category)
    if archive is not None:
        _verify_and_extract(archive, data_root, category, source=f"drop-in {archive}",
                            delete_if_corrupt=False)
        return category_dir
    if not download:
        raise DataError(f"category '{category}' not found in {{data_root}} {data_root}: {where}, "
                        f"or drop {{download}}{_custom_hint(data_root)}")
    mirror = mirror or os.environ.get(MIRROR_VARIABLE) or None
    sources = [("mirror", _mirror_archive(mirror, category))] if mirror else []
    sources += [("MVTec", url) for url in CATEGORY_LINKS.get(category, [])]
    if not sources:
        raise DataError(f"category '{category}' not found in {{data_root}} {data_root} and it is "
                        f"not an MVTec AD category that can be downloaded: {where}")
    data_root.mkdir(parents=True, exist_ok=True)
    part = data_root / f".{category}.tar.xz.part"
    failures = []
    for kind, url in sources:
        try:
            _download(url, part, desc=f"download {category}", progress=progress)
        except _Failure as failure:
            failures.append((kind, url, failure))
            continue
        _verify_and_extract(part, data_root, category, source=url, delete_if_corrupt=True)
        part.unlink()
        log.info("%s: downloaded from %s", category, url)
        return category_dir
    raise DataError(_failure_message(category, data_root, failures))


def _mirror_archive(mirror: str, category: str) -> str:
    """The mirror's URL of the category's archive. A mirror without a URL scheme is a folder (a
    lab's shared drive), read through a file: URL like any other source."""
    base = mirror.rstrip("/")
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base}/{category}.tar.xz"


def _failure_message(category: str, data_root: Path, failures: list) -> str:
    drop_in = f"download {category}.tar.xz from {MVTEC_PAGE} and put it in {data_root}"
    mvtec = [f for kind, _, f in failures if kind == "MVTec"]
    mirrors = [(url, f) for kind, url, f in failures if kind == "mirror"]
    parts = [f"the mirror's {url} answered {f}" for url, f in mirrors]
    if mvtec and all(f.http_status in (404, 410) for f in mvtec):
        status = mvtec[0].http_status
        parts.append(f"MVTec's links for {category} are gone (HTTP {status})")
    elif mvtec:
        reasons = dict.fromkeys(map(str, mvtec))  # offline, every link fails the same way: once
        parts.append(f"MVTec's links for {category} failed ({'; '.join(reasons)})")
    return f"could not download MVTec AD '{category}': {', and '.join(parts)}: {drop_in}, " \
           "or pass {mirror} URL"


def _is_web_page(headers, start: bytes) -> bool:
    """A share link that expired, or a proxy's login, often answers 200 with an HTML page: told
    apart from an archive by its Content-Type or its first bytes, so the next link is tried."""
    head = start[:512].lstrip().lower()
    return headers.get_content_type() == "text/html" or head.startswith((b"<!doctype html",
                                                                          b"<html"))


def _download(url: str, target: Path, desc: str, chunk: int = 1 << 20,
              progress: bool = True) -> None:
    """Fetch ``url`` into ``target``, resuming a partial file of the same URL with Range."""
    origin = target.with_name(target.name + ".url")  # the URL the partial file came from
    if target.exists() and (not origin.exists() or origin.read_text() != url):
        target.unlink()  # a partial file of another source: not resumable
    origin.write_text(url)
    for attempt in range(RESUME_ATTEMPTS):
        done = target.stat().st_size if target.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                resumed = getattr(response, "status", None) == 206
                if not resumed:
                    done = 0  # the server ignored the range (or a file:// URL): start over
                length = response.headers.get("Content-Length")
                total = int(length) + done if length else None
                block = response.read(chunk)
                if not resumed and _is_web_page(response.headers, block):
                    target.unlink(missing_ok=True)  # an older partial: it would start over anyway
                    origin.unlink()
                    raise _Failure("a web page (HTML) instead of the archive: an expired link "
                                   "or a login page")
                with open(target, "ab" if resumed else "wb") as out, \
                        tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=desc,
                             leave=False, disable=not progress) as bar:
                    while block:
                        out.write(block)
                        bar.update(len(block))
                        block = response.read(chunk)
                if total is not None and target.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - target.stat().st_size)
            origin.unlink()
            return
        except urllib.error.HTTPError as error:
            error.close()  # it holds the response's socket; every dead link would leak one
            if error.code == 416 and done:  # the range starts at the end: already complete
                origin.unlink()
                return
            _forget_origin(origin, target)
            raise _Failure(f"HTTP {error.code}", error.code) from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
            if attempt + 1 == RESUME_ATTEMPTS:  # kept: the next run resumes from here
                raise _Failure(f"an interrupted transfer ({type(error).__name__})") from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            _forget_origin(origin, target)
            if isinstance(reason, FileNotFoundError):  # a file: URL, a folder as mirror
                raise _Failure("no such file") from None
            if isinstance(error, ValueError) or str(reason).startswith("unknown url type"):
                raise _Failure(f"an address it cannot open ({reason})") from None
            raise _Failure(f"no connection ({reason})") from None


def _forget_origin(origin: Path, target: Path) -> None:
    """The record of where a partial file came from, once there is no partial file to resume."""
    if not target.exists():
        origin.unlink(missing_ok=True)


def _folder_above(name: str, category: str) -> str | None:
    """The path prefix above ``<category>/train/good/`` in an archive member's name ("" for a
    category archive, also "" for the whole dataset's archive, whose top level is the categories),
    or None if the member is not a training image of the category."""
    marker = f"{category}/train/good/"
    at = name.find(marker)
    if at < 0 or (at > 0 and name[at - 1] != "/"):
        return None
    return name[:at]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verify_and_extract(archive: Path, data_root: Path, category: str, source: str,
                        delete_if_corrupt: bool) -> None:
    """Extract ``category`` from ``archive`` (its own or the whole dataset's) after listing it in
    full; record where it came from and the archive's MD5 in ``<category>/.source.json``."""
    name = archive.name.removeprefix(".").removesuffix(".part")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()  # reads the whole archive: a truncated file fails here
            tops = (_folder_above(m.name.removeprefix("./"), category) for m in members)
            top = next((t for t in tops if t is not None), None)
            if top is None:
                raise DataError(f"{archive} does not hold {category}/train/good: it is not an "
                                f"MVTec AD archive of {category}; replace it with one from "
                                f"{MVTEC_PAGE}")
            inside = f"{top}{category}/"
            wanted = [m for m in members if m.name.removeprefix("./").startswith(inside)]
            staging = Path(tempfile.mkdtemp(prefix=f".{category}.", dir=data_root))
            try:
                tar.extractall(staging, members=wanted, filter="data")
                shutil.move(str(staging / inside), str(data_root / category))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        # tarfile lists every compression it tried, one line each: the first line says enough
        why = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        if delete_if_corrupt:
            archive.unlink(missing_ok=True)  # the next run downloads it anew
            raise DataError(f"the archive of '{category}' from {source} is corrupt ({why}); it "
                            "was deleted, run again to download it anew") from None
        raise DataError(f"{archive} is corrupt ({why}): replace it with a complete download "
                        f"from {MVTEC_PAGE}") from None
    md5 = _md5(archive)
    published = PUBLISHED_MD5.get(name) or PUBLISHED_MD5.get(name.removesuffix(".tar.xz"))
    record = {"archive": name, "source": source, "md5": md5, "published_md5": published,
              "matches_published_md5": md5 == published if published else None}
    (data_root / category / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def source_record(category_dir: str | Path) -> dict | None:
    """Where an extracted category came from (None if it was put there by hand)."""
    try:
        return json.loads((Path(category_dir) / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None
