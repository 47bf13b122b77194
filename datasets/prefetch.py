"""Batches of a loader read ahead in one background thread: overlap without loader processes.

When every image of a split is in the decode cache, loading a batch is a few file reads that
release the GIL, so a thread can read the next batches while the main thread drives the model.
Loader processes would do the same but cost more to start and join, twice per category, than the
reads they would overlap.
"""
from __future__ import annotations

import queue
import threading

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class ThreadPrefetcher:
    """Iterable over ``loader``'s batches, up to ``depth`` read ahead; errors surface unchanged."""

    def __init__(self, loader, depth: int = 3):
        self.loader, self.depth = loader, depth
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():  # the consumer may have stopped early: do not block forever
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    pass

        def read() -> None:
            try:
                for batch in self.loader:
                    put(batch)
                    if stop.is_set():
                        return
            except BaseException as error:  # re-raised in the consumer, same type and message
                put(_Failure(error))
            put(_DONE)

        reader = threading.Thread(target=read, name="prefetch", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            reader.join()
