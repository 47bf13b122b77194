"""Batches of images for the models: the one place that decides how images are read.

A model sees ``Batch(images, indices, masks)`` and ``ImageBatches.n_images``, never a DataLoader,
a dataset or a batch dict. How the images are read is chosen here:
- every image of the split already in the decode cache: one background thread reads ahead
  (a cached image is a small file read, and loader processes cost more to start than they save);
- otherwise DataLoader processes decode (up to 8 with a GPU, up to 2 on a CPU, where more take
  cores from the compute threads), unless ``workers`` says how many.
A UserError raised for an image in a loader process (a truncated PNG, a mask of the wrong size)
reaches the caller as the same one-line error it would be in this process, not wrapped in the
worker's traceback; or, with ``on_failed``, the image is left out of its batch and reported.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from datasets.prefetch import ThreadPrefetcher
from utils.errors import UserError
from utils.processes import sigterm_as_interrupt


class Batch(NamedTuple):
    images: torch.Tensor   # uint8 [B, 3, H, W]
    indices: torch.Tensor  # int64 [B]: positions in the split (what provenance records)
    masks: torch.Tensor    # uint8 [B, H, W]: ground truth, zeros where there is none


def default_workers(device: torch.device | str) -> int:
    return min(8 if torch.device(device).type == "cuda" else 2, os.cpu_count() or 1)


class _Failed(NamedTuple):
    """An item that raised a UserError: the error travels as data."""
    error: UserError
    index: int


class _ErrorsAsItems(torch.utils.data.Dataset):
    """The dataset, with a UserError of an item returned instead of raised. Raised in a loader
    process, DataLoader would re-raise it here as a new error whose message is the worker's whole
    traceback; returned, the error object itself (message, type, settings named in it) arrives
    intact and is raised by the consumer."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UserError as error:
            return _Failed(error, index)


def stacked(items: list[dict]) -> dict:
    """``default_collate``'s batch of dataset items (dicts of tensors and ints), stacked by NumPy.
    For the reading thread: there a torch copy runs through the intra-op thread pool beside the
    model's and is many times slower than one NumPy copy (benchmarks/RESULTS.md)."""
    return {key: torch.from_numpy(np.stack([item[key].numpy() for item in items]))
            if isinstance(items[0][key], torch.Tensor) else
            torch.tensor([item[key] for item in items]) for key in items[0]}


def _collate(items: list, stack=torch.utils.data.default_collate
             ) -> tuple[dict | None, list[_Failed]]:
    """(the batch of the items that loaded, None if none did; the items that failed)."""
    loaded = [item for item in items if not isinstance(item, _Failed)]
    return (stack(loaded) if loaded else None,
            [item for item in items if isinstance(item, _Failed)])


class ImageBatches:
    """Iterable of ``Batch`` over a dataset whose items are dicts with image, index and mask.
    ``indices``: only these items (their ``Batch.indices`` stay positions in the whole dataset,
    and ``n_images`` stays the whole dataset's count, as a distributed fit's shard plan needs).
    ``on_failed(index, error)``: called for an item that raised a UserError, which its batch then
    leaves out (a batch may come shorter); without it the error is raised."""

    def __init__(self, dataset, batch_size: int, device: torch.device | str = "cpu",
                 workers: int | None = None, progress: bool = False, desc: str = "",
                 indices: list[int] | None = None,
                 on_failed: Callable[[int, UserError], None] | None = None):
        self.dataset, self.batch_size, self.on_failed = dataset, batch_size, on_failed
        items = _ErrorsAsItems(dataset)
        if indices is not None:
            items = torch.utils.data.Subset(items, list(indices))
        self.progress, self.desc = progress, desc
        pin = torch.device(device).type == "cuda"

        def loader(processes: int, collate=_collate):
            return torch.utils.data.DataLoader(items, batch_size=batch_size,
                                               shuffle=False, num_workers=processes,
                                               pin_memory=pin, collate_fn=collate,
                                               worker_init_fn=sigterm_as_interrupt)

        if workers is not None:
            self.loader = loader(workers)
        elif dataset.fully_cached():  # (of the whole split: a part of it is no less cached)
            self.loader = ThreadPrefetcher(loader(0, partial(_collate, stack=stacked)))
        else:
            self.loader = loader(default_workers(device))

    @property
    def n_images(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for item, failed in tqdm(self.loader, desc=self.desc, leave=False,
                                 disable=not self.progress):
            for each in failed:
                if self.on_failed is None:
                    raise each.error
                self.on_failed(each.index, each.error)
            if item is not None:
                yield Batch(item["image"], item["index"], item["mask"][:, 0])


class TensorBatches:
    """``Batch``es of images already in memory (uint8 [N, 3, H, W]), e.g. to fit a model from a
    notebook: ``model.fit(TensorBatches(images))``."""

    def __init__(self, images: torch.Tensor, batch_size: int = 8):
        self.images, self.batch_size = images, batch_size

    @property
    def n_images(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            images = self.images[start:start + self.batch_size]
            yield Batch(images, torch.arange(start, start + len(images)),
                        torch.zeros(len(images), *images.shape[-2:], dtype=torch.uint8))
