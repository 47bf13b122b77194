"""What produced a result: library versions, the machine, the code's commit, the weights and data.

The same flags on the same data moved the official PatchCore code by 1.6 image-AUROC points between
two torch/faiss releases, so every metrics.json says exactly what it was computed with.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from utils.files import visible_files

REPO = Path(__file__).resolve().parents[1]
# distribution name on PyPI -> key in the record
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "faiss-cpu": "faiss",
            "faiss-gpu": "faiss", "numpy": "numpy", "opencv-python-headless": "opencv",
            "opencv-python": "opencv", "scipy": "scipy", "scikit-learn": "scikit-learn"}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {key: None for key in PACKAGES.values()}
    versions["python"] = platform.python_version()
    for distribution, key in PACKAGES.items():
        try:
            versions[key] = versions[key] or metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return versions


MEMINFO = "/proc/meminfo"
# (limit, usage) files of the memory cgroup a container sees as its root: cgroup v2, then v1
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def free_memory_bytes(device: str) -> int | None:
    """Memory a fit on ``device`` can still take: a GPU's free memory plus what torch holds
    cached but unused; on a CPU, Linux's MemAvailable, or less where a container's memory limit
    is nearer (the limit is what ends a process there). None where it is not known."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        meminfo = Path(MEMINFO).read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)[1]) * 1024
    except (OSError, TypeError):  # not Linux, or a kernel without MemAvailable
        return None
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit, usage = (Path(name).read_text().strip() for name in (limit_file, usage_file))
            if limit != "max":
                available = min(available, int(limit) - int(usage))
            break
        except (OSError, ValueError):
            continue
    return available


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit, with '+modified' when tracked files differ from it; None outside a
    git checkout (an installed copy)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+modified" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hashed once per process for a file unchanged since (a sweep records the
    same weights file in every run's metrics.json)."""
    status = os.stat(path)
    return _sha256(str(Path(path).resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: the cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


DATA_FOLDERS = ("train", "test", "ground_truth")


def data_fingerprint(category_dir: str | Path) -> dict:
    """How many files a category's data folders hold and a sha256 of their relative paths and
    sizes: cheap (no file is read), and it changes when a file is added, removed, renamed or
    resized. Only train/, test/ and ground_truth/, the folders the reader lists (datasets.mvtec):
    notes or a result folder beside them are not data."""
    root = Path(category_dir)
    files = sorted(path for folder in DATA_FOLDERS for path in visible_files(root / folder))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return {"files": len(files), "sha256": digest.hexdigest()}


def environment(device: str, weights: str | Path | None) -> dict:
    return {"started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": package_versions(), "device": device_name(device),
            "platform": f"{platform.system()} {platform.machine()}",
            "git_commit": git_commit(),
            "weights_sha256": file_sha256(weights) if weights is not None else None}
