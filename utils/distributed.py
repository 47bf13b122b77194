"""Runs over several processes, one device each, through ``torch.distributed``.

Launch with ``torchrun`` (one machine: ``--standalone --nproc-per-node N``; several: its
rendezvous options, also under Slurm); it sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address that ``init_process_group`` reads. The backend is nccl on GPUs and gloo on CPUs. Without
torchrun (WORLD_SIZE unset or 1) everything runs in this one process and ``Group.single()``
answers every collective locally, so the pipeline has one code path.

What is spread, and why the result does not depend on the number of processes, is in
``pipeline.py`` (``Run``): work is divided by the data and the flags (categories, coreset shards,
blocks of whole batches), never by the process count, and rank 0 writes the combined outputs.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


def launched_as_main() -> bool:
    """Whether this is rank 0 of torchrun's processes, or the only process: from the environment,
    for what every process finds alike and one should say, before (or without) a ``Group``."""
    return os.environ.get("RANK", "0") == "0"


said_once: set[tuple[str, object]] = set()  # (logger, key) of every warn_once said


def warn_once(logger: str, message: str, key: object = None) -> None:
    """Warn of something every torchrun process finds alike (a setting, the data's folders) once:
    by rank 0 only, and once per process, as a sweep resolves its settings once per point. Said
    once per ``key``, by default the message itself; a key names one cause whose messages differ
    in detail (each category's cache sub-folder, when the cache's root cannot be written)."""
    said = (logger, message if key is None else key)
    if said not in said_once and launched_as_main():
        said_once.add(said)
        logging.getLogger(logger).warning(message)


@dataclass
class Group:
    rank: int = 0
    world: int = 1

    @classmethod
    def single(cls) -> "Group":
        return cls()

    @classmethod
    def from_environment(cls, device: str) -> "Group":
        """The process group torchrun describes in the environment, or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        if not dist.is_initialized():
            # what init_process_group's env:// rendezvous reads; torchrun sets them all, and a
            # WORLD_SIZE alone (left in a shell, set by another tool) is no launch
            missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT")
                       if name not in os.environ]
            if missing:
                raise UserError(f"WORLD_SIZE={world} asks for {world} processes, but "
                                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                "not set: start the run with torchrun (README, Scale), or unset "
                                "WORLD_SIZE to run in this one process")
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=2))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_gather(self, value) -> list:
        """Every process's ``value`` (any picklable object, tensors included), in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value, source: int = 0):
        """``source``'s ``value`` on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=source)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
