"""Files that appear whole or not at all, the files below a folder that are data, and one run at a
time in a result folder."""
from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from utils.errors import DataError


@contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A reader (or a crash, or Ctrl-C) never sees a half-written file: it sees the previous complete
    one or none. The temporary name keeps ``path``'s suffix (matplotlib and OpenCV pick the format
    from it) and carries the process id, so parallel writers of one path never share it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomically(path: str | Path, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def probe_writable(folder: str | Path) -> None:
    """Make ``folder`` if missing and write a file in it, removed again: raises the OSError that
    writing there would meet (read-only, no permission, a file in the way)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder):
        pass


def probe_creatable(folder: str | Path) -> None:
    """Raise the OSError that making ``folder`` (if missing) and writing in it would meet, and
    leave nothing behind: a run that stops before its first output, or only estimates one
    (``--dry-run``), must not leave empty folders. A missing folder is probed by a temporary
    folder made and removed in its nearest existing parent."""
    folder = Path(folder).absolute()
    if folder.is_dir():
        probe_writable(folder)  # makes nothing: it exists
        return
    parent = folder
    while not os.path.lexists(parent):  # the root exists, so this ends
        parent = parent.parent
    if not parent.is_dir():  # a file (or a dangling link) where a folder would have to be made
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    os.rmdir(tempfile.mkdtemp(dir=parent))


def names_apart(paths: list[Path], root: Path) -> list[str]:
    """Each path below ``root`` without its extension, as a name that no other of ``paths`` gets,
    so outputs named after their inputs never overwrite one another. Two that differ only in
    their extension (000.png, 000.jpg) keep it (000_png, 000_jpg); anything still shared (000.PNG
    beside 000.png on a case-sensitive disk) is numbered."""
    bare = [path.relative_to(root).with_suffix("").as_posix() for path in paths]
    shared = {name for name, count in Counter(bare).items() if count > 1}
    taken: set[str] = set()
    return [numbered_apart(f"{name}_{path.suffix[1:].lower()}" if name in shared else name, taken)
            for name, path in zip(bare, paths)]


def numbered_apart(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``... when it is taken already; added to ``taken``."""
    unique, count = name, 0
    while unique in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique)
    return unique


def visible_files(folder: str | Path) -> list[Path]:
    """Every file below ``folder``, sorted, except hidden ones (a leading dot in the file's name
    or a folder's below ``folder``): never data. macOS leaves an AppleDouble ``._000.png`` beside
    every image it copies to a foreign disk; Jupyter keeps ``.ipynb_checkpoints/``."""
    found, walked = [], set()
    # os.walk with followlinks: a sub-folder linked in from other storage (good/day1 -> /nas/...)
    # is data too, and pathlib's rglob skipped it without a word; each real folder once, so a
    # link back up the tree cannot loop
    for root, folders, files in os.walk(folder, onerror=_unlisted, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders[:] = []
            continue
        walked.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, name) for name in files if not name.startswith(".")
                  and _is_file(os.path.join(root, name))]
    return sorted(found)


def _unlisted(error: OSError) -> None:
    """os.walk's answer to a folder it cannot list: by default it goes on without it, which left
    a sub-folder without read permission (another user's copy) out of the data without a word.
    A folder that is not there (``visible_files`` of a missing one) has nothing to list."""
    if not isinstance(error, (FileNotFoundError, NotADirectoryError)):
        raise DataError(f"cannot list {error.filename} ({error.strerror}); give yourself read "
                        "access to it, or move it out of the data")


def _is_file(path: str) -> bool:
    """Whether ``path`` is a file (sockets and the like are not data). os.walk lists a link to
    nothing as a file; left out, what it stood for (a folder on a drive that is not mounted)
    would be missing from the data without a word, so it is refused, naming where it points."""
    if os.path.isfile(path):
        return True
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(f"{path} links to {os.readlink(path)}, which does not exist (a drive not "
                        "mounted?); mount it, or delete the link")
    return False


class FolderLock:
    """One run at a time in a result folder. A second run started into a folder that a run is
    still writing moved that run's outputs to previous/ mid-way, and then both wrote the same
    files: one run's results lost, the folder a mix of the two.

    ``hold`` takes an advisory lock (flock) on ``<folder>/<name>`` and writes who holds it there;
    ``release`` removes the file (and the folder, when holding it was all that made it). The system
    drops the lock when the process ends, however it ends (a crash, a lost machine's reboot,
    kill -9), so a stale file never blocks a run. Where flock does not exist (Windows) a folder is
    not guarded."""

    def __init__(self, folder: str | Path, name: str = ".run.lock"):
        self.folder, self.path = Path(folder), Path(folder) / name
        self._file, self._made = None, False

    def hold(self) -> None:
        """Raises ``FolderInUse`` naming the holder when another process holds the folder."""
        try:
            import fcntl
        except ImportError:
            return
        self._made = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                handle.close()  # a file system without locks (ENOLCK): the folder is not guarded
                return
            # held elsewhere (EACCES on some network file systems)
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise FolderInUse(self.folder, holder) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {started}")
        handle.flush()
        self._file = handle

    def __enter__(self) -> "FolderLock":  # held already: ``with`` releases it at the end
        return self

    def __exit__(self, *exception) -> None:
        self.release()

    def release(self) -> None:
        if self._file is None:
            return
        # removed while still held: a run that opens it now finds it held, one after the removal
        # makes a new file
        self.path.unlink(missing_ok=True)
        self._file.close()
        self._file = None
        if self._made:
            try:
                self.folder.rmdir()  # only when empty: the run wrote nothing there
            except OSError:
                pass


class FolderInUse(Exception):
    """Raised by ``FolderLock.hold``; the caller names the setting the folder came from."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is held by {holder or 'another process'}")
        self.folder, self.holder = folder, holder or "another process"
