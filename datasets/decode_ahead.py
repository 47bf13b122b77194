"""Decode a run's images into the cache ahead of use, one image per task, on every spare core.

On a cold cache a GPU run waits for PNG decoding. DataLoader processes each decode a whole batch:
a test split of 115 images in batches of 32 keeps only 4 processes busy however many there are,
and its first batch waits for 32 decodes in a row. Here single images go to a process pool in the
order the run will read them, starting when the run starts; while the GPU works on one category
the pool decodes the next ones. Loading a category first waits for its own images, then reads
them from the cache like any warm run.

Errors are not reported here: an image the pool cannot decode gets no cache entry, and the normal
load decodes it again and reports it as it always does (one line naming the file).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, wait

import cv2

from utils.processes import end_with_parent, interrupts_held

_SPLITS: list = []  # the datasets, installed once in each pool process


def _install(splits: list, parent: int) -> None:
    global _SPLITS
    _SPLITS = splits
    end_with_parent(parent)
    # One image per process at a time: the pool already uses every spare core, so threads of
    # its own (torch's, OpenCV's) would only compete with the other processes for them. (OpenCV's
    # count is set by the parent before it forks: see DecodeAhead.)
    import torch
    torch.set_num_threads(1)


def _decode_into_cache(split: int, index: int) -> bool:
    """Whether the image is now in the cache."""
    try:
        _SPLITS[split].ensure_cached(index)
        return True
    except Exception:  # reported by the normal load of the same image (module docstring)
        return False


def default_processes(local_processes: int = 1) -> int:
    """Every core but one (the one driving the GPU), shared among the run's processes on it."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, local_processes))


class DecodeAhead:
    """``DecodeAhead({category: [datasets]}, processes)`` starts decoding at once, categories in
    the given order; ``wait(category)`` returns when that category's images are in the cache;
    ``close()`` stops the pool (images not yet started are dropped)."""

    def __init__(self, splits_by_category: dict[str, list], processes: int):
        self.splits = dict(splits_by_category)
        self.pending: dict[str, list[Future]] = {}
        self.pool = None
        work = {category: [split for split in splits if not split.fully_cached()]
                for category, splits in splits_by_category.items()}
        splits = [split for category_splits in work.values() for split in category_splits]
        if not splits or processes < 1:
            return
        # fork, as DataLoader's processes: the datasets are inherited, not re-imported; the
        # children never touch the GPU.
        context = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        # A forked child inherits OpenCV's thread pool as a copy without its threads, and
        # resizing that pool there (cv2.setNumThreads) hangs once the parent's pool has run. So
        # the parent drops to one thread while it forks (a fork pool starts every process at
        # the first submit), the children inherit that, and the parent's count comes back.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            self.pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_install,
                                            initargs=(splits, os.getpid()))
            number = 0
            with interrupts_held():  # the pool's processes start at the first submit
                for category, category_splits in work.items():
                    futures = self.pending.setdefault(category, [])
                    for split in category_splits:
                        futures += [self.pool.submit(_decode_into_cache, number, index)
                                    for index in range(len(split))]
                        number += 1
        finally:
            cv2.setNumThreads(threads)

    def wait(self, category: str) -> list | None:
        """Wait for the category's images; return its datasets, known to be fully cached (so
        the run can read them without listing and checking them again), or None if an image
        could not be decoded (the normal load reports or skips it) or the category is not here.
        """
        futures = self.pending.pop(category, [])
        wait(futures)
        splits = self.splits.pop(category, None)
        if splits is None or not all(not f.cancelled() and f.exception() is None and f.result()
                                     for f in futures):
            return None
        for split in splits:
            split.mark_fully_cached()
        return splits

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
