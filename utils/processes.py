"""How a run ends, and its helper processes (loading, decoding ahead, drawing) with it."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch system's time limit, torchrun ending the other
    processes when one fails), raised by ``raise_terminated`` to take Ctrl-C's way out: the
    drawing and decoding processes are ended, the finished outputs kept and said."""


def raise_terminated(signum, frame):
    """A SIGTERM handler (``signal.signal``): Python's default ends the process at once, leaving
    the spawned drawing processes waiting for work that never comes."""
    raise Terminated


def end_with_parent(parent: int, poll_seconds: float = 0.5) -> None:
    """In a pool's process, at its start: exit as soon as ``parent``, the process that started
    the pool (``os.getpid()`` there, passed in: a spawned process may still be importing when a
    run killed early is gone), is gone. A run killed outright (SIGKILL, the out-of-memory killer)
    shuts no pool down, and a pool process waits on a queue whose writing end it holds itself,
    so it would wait for ever. (DataLoader's processes have a watchdog of their own.)"""
    def watch() -> None:
        while os.getppid() == parent:  # the parent's death hands the process to another
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


@contextlib.contextmanager
def interrupts_held():
    """Around starting a pool's processes: they begin with SIGINT and SIGTERM blocked (a signal
    mask is inherited), so that a signal sent to the whole process group -- Ctrl-C typed in the
    terminal, a batch system's time limit -- is the run's alone to take: it neither stops each
    helper with a traceback of its own, nor a drawing process before the figures queued are
    drawn (``pipeline.finish_after_interrupt``). The run then ends them; one it never ends
    exits when the run is gone (``end_with_parent``). Before Python 3.11 a pool whose process
    died while large work items were queued (figures) also waited for ever in its shutdown
    (CPython gh-94777). A signal meanwhile waits and reaches the run afterwards. (No signal
    masks on Windows.)"""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def sigterm_as_interrupt(worker_id: int = 0):
    """SIGTERM raises ``Terminated``, a KeyboardInterrupt: in the run (main.py),
    Ctrl-C's way out; as a DataLoader's ``worker_init_fn``, the end its worker loop takes.
    DataLoader's own handler ends the process by the signal, and a run stopped by a SIGTERM sent
    to its whole process group (a batch system, systemd) then met DataLoader's "worker killed by
    signal" error, raised at any point of writing what it kept. Returns the handler it replaced
    (None off the main thread, where Python cannot set one: the default stays)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_terminated)
